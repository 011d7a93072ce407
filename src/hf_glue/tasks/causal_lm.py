"""Causal language modelling: next-token loss on a text column; perplexity as the metric."""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F

from ..config import DataConfig
from .base import Task, load_tokenizer, pick_column, register_task, wide_sum

TEXT_COLUMNS = ("text", "content", "document", "sentence", "code")


@register_task
class CausalLM(Task):
    name = "causal-lm"
    pretty_name = "Causal language modelling"
    auto_model = "AutoModelForCausalLM"
    pipeline_tag = "text-generation"
    architecture_suffixes = ("ForCausalLM", "LMHeadModel")
    primary_metric = "perplexity"
    greater_is_better = False

    def load_processor(self, path, trust_remote_code=False):
        return load_tokenizer(path, trust_remote_code)

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        return {"text": pick_column("text", data.text_column, TEXT_COLUMNS, column_names, "--text-column")}

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        def encode(rows):
            return processor(rows[columns["text"]], truncation=True, max_length=data.max_length)

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(processor, mlm=False, return_tensors="pt")

    def head_module(self, model):
        return None  # next-token prediction has no class head: LogME does not apply

    def batch_stats(self, outputs, batch):
        logits = outputs.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        return {
            "loss_sum": wide_sum(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="none")),
            "count": wide_sum(mask),
        }

    def compute_metrics(self, model_config: dict, processor):
        return None  # perplexity comes from the eval loss; no logits need to be gathered

    def finalize(self, sums):
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
