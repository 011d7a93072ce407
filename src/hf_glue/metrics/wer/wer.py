"""Word and character error rates (WER, CER), as a local `evaluate` module (loaded by path, so nothing is fetched
from the Hub; no jiwer needed)."""

import datasets
import evaluate

from hf_glue.metrics.edit_distance import error_counts, rates

_DESCRIPTION = ("Word error rate: the word-level edit distance (substitutions + deletions + insertions) between "
                "predictions and references, summed over the corpus and divided by the number of reference words; "
                "character error rate likewise over characters (words joined by single spaces).")
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): transcriptions.
    references (`list` of `str`): reference transcripts (whitespace separates words).
Returns:
    wer (`float`): corpus word error rate (0 is perfect; can exceed 1).
    cer (`float`): corpus character error rate.
"""


class WER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return rates(error_counts(predictions, references))
