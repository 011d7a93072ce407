"""Exact match, token F1 and ROUGE-L of generated text against references, as a local `evaluate` module (loaded
by path, so nothing is fetched from the Hub; no `rouge_score` package needed)."""

import datasets
import evaluate

from hf_glue.metrics.scores import text_overlap_scores

_DESCRIPTION = ("Text overlap of predictions with references, on whitespace tokens after lowercasing: exact match, "
                "token F1 (the overlap of the bags of tokens, as SQuAD scores it) and ROUGE-L (the F-measure of the "
                "longest common token subsequence: order-aware). Each is the mean over pairs.")
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`): reference texts.
Returns:
    exact_match, token_f1, rougeL (`float`): in [0, 1].
"""


class TextOverlap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return text_overlap_scores(predictions, references)
