"""F1 score (binary, or macro over classes), as a local `evaluate` module loaded by path."""

import datasets
import evaluate

_DESCRIPTION = "F1: the harmonic mean of precision and recall; binary for two classes, else macro-averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    average (`str`, defaults to `"binary"`): "binary" (class `pos_label`) or "macro" (mean over classes).
    pos_label (`int`, defaults to 1): the positive class for binary F1.
Returns:
    f1 (`float`): in [0, 1].
"""


def _f1(predictions, references, label):
    tp = sum(1 for p, r in zip(predictions, references) if p == label and r == label)
    fp = sum(1 for p, r in zip(predictions, references) if p == label and r != label)
    fn = sum(1 for p, r in zip(predictions, references) if p != label and r == label)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        if average == "binary":
            return {"f1": _f1(predictions, references, pos_label)}
        labels = sorted(set(references) | set(predictions))
        return {"f1": sum(_f1(predictions, references, c) for c in labels) / len(labels) if labels else 0.0}
