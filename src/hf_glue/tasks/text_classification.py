"""Sequence (and sentence-pair) classification with the experts' tokenizer."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import GlueError
from .base import Task, pick_column, register_task

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "sentence1", "question")
PAIR_COLUMNS = ("sentence2", "text_pair", "question2")
LABEL_COLUMNS = ("label", "labels", "class", "target", "category")


@register_task
class SequenceClassification(Task):
    name = "sequence-classification"
    pretty_name = "Sequence classification"
    auto_model = "AutoModelForSequenceClassification"
    pipeline_tag = "text-classification"
    architecture_suffixes = ("ForSequenceClassification",)
    primary_metric = "accuracy"

    def load_processor(self, path, trust_remote_code=False):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        columns = {
            "text": pick_column("text", data.text_column, TEXT_COLUMNS, column_names, "--text-column"),
            "label": pick_column("label", data.label_column, LABEL_COLUMNS, column_names, "--label-column"),
        }
        pair = data.text_pair_column
        if pair is None and columns["text"] == "sentence1":
            pair = next((c for c in PAIR_COLUMNS if c in column_names), None)
        if pair:
            columns["text_pair"] = pick_column("text pair", pair, PAIR_COLUMNS, column_names, "--text-pair-column")
        return columns

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        num_labels = len(model_config.get("id2label") or {}) or model_config.get("num_labels", 2)
        if num_labels < 2:
            raise GlueError("the experts have a single-output (regression) head; only classification is supported.")
        to_id = _label_mapper(dataset, columns["label"], model_config, num_labels)
        if processor.pad_token is None:
            processor.pad_token = processor.eos_token

        def encode(rows):
            pair = rows[columns["text_pair"]] if "text_pair" in columns else None
            enc = processor(rows[columns["text"]], pair, truncation=True, max_length=data.max_length)
            enc["labels"] = [to_id(v) for v in rows[columns["label"]]]
            return enc

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor, return_tensors="pt")

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


def _label_mapper(dataset, column: str, model_config: dict, num_labels: int):
    """Map label values to class ids: ints as they are (range-checked), strings through the experts' label2id."""
    values = dataset.unique(column)
    if all(isinstance(v, (int,)) and not isinstance(v, bool) for v in values):
        bad = [v for v in values if not 0 <= v < num_labels]
        if bad:
            raise GlueError(
                f"label column {column!r} has value {bad[0]} but the experts' head has {num_labels} classes "
                f"(0..{num_labels - 1}); check --label-column."
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
