"""What every classification task shares: label mapping, loss/accuracy sums, Trainer metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import GlueError
from .base import Task


class ClassificationTask(Task):
    """A task whose model returns class logits and whose batches carry integer ``labels``."""

    primary_metric = "accuracy"

    def batch_stats(self, outputs, batch):
        logits = outputs.logits.float()
        labels = batch["labels"]
        return {
            "loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
            "count": torch.tensor(float(labels.numel()), device=logits.device),
            "correct": (logits.argmax(-1) == labels).sum().float(),
        }

    def finalize(self, sums):
        return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}

    def compute_metrics(self, model_config: dict):
        """A `Trainer` ``compute_metrics``: accuracy and F1 (binary for 2 classes, else macro) via `evaluate`."""
        from ..metrics import load_metric

        accuracy, f1 = load_metric("accuracy"), load_metric("f1")
        average = "binary" if num_labels(model_config) == 2 else "macro"

        def compute(eval_pred):
            logits, labels = eval_pred
            predictions = logits.argmax(-1)
            return {**accuracy.compute(predictions=predictions, references=labels),
                    **f1.compute(predictions=predictions, references=labels, average=average)}

        return compute


def num_labels(model_config: dict) -> int:
    return len(model_config.get("id2label") or {}) or int(model_config.get("num_labels", 2))


def label_mapper(dataset, column: str, model_config: dict):
    """Map label values to class ids: ints as they are (range-checked), strings through the experts' label2id."""
    n = num_labels(model_config)
    if n < 2:
        raise GlueError("the experts have a single-output (regression) head; only classification is supported.")
    values = dataset.unique(column)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = [v for v in values if not 0 <= v < n]
        if bad:
            raise GlueError(
                f"label column {column!r} has value {bad[0]} but the experts' head has {n} classes "
                f"(0..{n - 1}); check --label-column."
            )
        return int
    label2id = model_config.get("label2id") or {}
    missing = [v for v in values if str(v) not in label2id]
    if missing:
        raise GlueError(
            f"label column {column!r} has value {missing[0]!r}, which is not among the experts' labels "
            f"{sorted(label2id)}; check --label-column."
        )
    return lambda v: int(label2id[str(v)])
