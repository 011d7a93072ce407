"""What every classification task shares: label mapping, loss/accuracy sums, Trainer metrics."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import GlueError
from .base import Task, wide_sum


class ClassificationTask(Task):
    """A task whose model returns class logits and whose batches carry integer ``labels``."""

    primary_metric = "accuracy"

    def batch_stats(self, outputs, batch):
        logits = outputs.logits.float()
        labels = batch["labels"]
        return {
            "loss_sum": wide_sum(F.cross_entropy(logits, labels, reduction="none")),
            "count": wide_sum(torch.ones_like(labels)),
            "correct": wide_sum(logits.argmax(-1) == labels),
        }

    def finalize(self, sums):
        return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}

    def compute_metrics(self, model_config: dict, processor):
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
    """Map label values to class ids: ints as they are, whole floats and digit strings as the ints they spell, other
    strings through the experts' label names (``label2id``, else ``id2label``, else transformers' default
    ``LABEL_i``); every value is checked against the head's classes before any row is mapped."""
    n = num_labels(model_config)
    if n < 2:
        raise GlueError("the experts have a single-output (regression) head; only classification is supported.")
    names = ({str(k): int(v) for k, v in (model_config.get("label2id") or {}).items()}
             or {str(v): int(k) for k, v in (model_config.get("id2label") or {}).items()}
             or {f"LABEL_{i}": i for i in range(n)})

    def to_id(value) -> Optional[int]:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return names[value] if value in names else int(value) if value.strip().isdigit() else None
        return None

    shown = sorted(names, key=names.get)
    shown = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
    for value in dataset.unique(column):
        class_id = to_id(value)
        if class_id is None or not 0 <= class_id < n:
            raise GlueError(f"label column {column!r} has value {value!r}, which is not one of the experts' {n} "
                            f"classes (0..{n - 1} or {shown}); check --label-column.")
    return to_id
