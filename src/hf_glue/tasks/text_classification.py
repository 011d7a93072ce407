"""Sequence (and sentence-pair) classification with the experts' tokenizer."""

from __future__ import annotations

from typing import Sequence

from ..config import DataConfig
from .base import load_tokenizer, pick_column, register_task
from .classification import ClassificationTask, label_mapper

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "sentence1", "question")
PAIR_COLUMNS = ("sentence2", "text_pair", "question2")
LABEL_COLUMNS = ("label", "labels", "class", "target", "category")


@register_task
class SequenceClassification(ClassificationTask):
    name = "sequence-classification"
    pretty_name = "Sequence classification"
    auto_model = "AutoModelForSequenceClassification"
    pipeline_tag = "text-classification"
    architecture_suffixes = ("ForSequenceClassification",)

    def load_processor(self, path, trust_remote_code=False):
        return load_tokenizer(path, trust_remote_code)

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
        to_id = label_mapper(dataset, columns["label"], model_config)

        def encode(rows):
            pair = rows[columns["text_pair"]] if "text_pair" in columns else None
            enc = processor(rows[columns["text"]], pair, truncation=True, max_length=data.max_length)
            enc["labels"] = [to_id(v) for v in rows[columns["label"]]]
            return enc

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor, return_tensors="pt")
