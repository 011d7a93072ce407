"""Entity-level precision/recall/F1 for token classification (seqeval's default mode), as a local `evaluate`
module (loaded by path, so nothing is fetched from the Hub; no `seqeval` package needed)."""

import datasets
import evaluate

from hf_glue.metrics.scores import seqeval_scores

_DESCRIPTION = ("Entity-level precision, recall and F1 (micro-averaged over entities; an entity counts when its "
                "type and both boundaries match) and token accuracy, as seqeval computes them in its default mode. "
                "Tags: IOB2, IOB1, IOE, BIOES/BILOU (PREFIX-TYPE) or O; a tag without a prefix reads as I-TYPE (IO).")
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): predicted tags, one list per sentence.
    references (`list` of `list` of `str`): reference tags, one list per sentence (same lengths).
Returns:
    precision, recall, f1 (`float`): entity-level, in [0, 1] (0 where undefined).
    accuracy (`float`): the fraction of tags equal to the reference.
    per_type (`dict`): {type: {precision, recall, f1, number}} (``number``: reference entities of the type).
"""


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references):
        return seqeval_scores(predictions, references)
