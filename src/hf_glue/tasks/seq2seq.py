"""Sequence-to-sequence LM (T5, BART): loss on labels; a generation-based metric for evaluation.

The search minimises the teacher-forced loss of the target tokens (the model shifts ``labels`` into its decoder
inputs itself), and reports perplexity and token accuracy. The merged model's held-out evaluation adds exact match,
token F1 and ROUGE-L of greedy `generate` outputs (`generation_metrics`, bundled ``text_overlap`` module).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import GlueError
from .base import Task, load_tokenizer, pick_column, register_task, wide_sum

SOURCE_COLUMNS = ("source", "input", "text", "document", "article", "question", "prompt", "src")
TARGET_COLUMNS = ("target", "summary", "output", "answer", "highlights", "response", "tgt")


@register_task
class Seq2SeqLM(Task):
    name = "seq2seq"
    pretty_name = "Sequence-to-sequence generation"
    auto_model = "AutoModelForSeq2SeqLM"
    pipeline_tag = "text2text-generation"
    architecture_suffixes = ("ForConditionalGeneration",)
    #: what the search optimises (as causal-lm); the generation metrics come only with the final evaluation
    primary_metric = "perplexity"
    greater_is_better = False

    def load_processor(self, path, trust_remote_code=False):
        return load_tokenizer(path, trust_remote_code)

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        source = pick_column("source text", data.text_column, SOURCE_COLUMNS, column_names, "--text-column")
        target = pick_column("target text", data.target_column, TARGET_COLUMNS, column_names, "--target-column")
        if source == target:
            raise GlueError(f"--text-column and --target-column both name column {source!r}; the source and the "
                            "target must be different columns.")
        # role "text" gets data.py's text checks (strings, not blank); the target is checked in `preprocess`
        return {"text": source, "target": target}

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        target = columns["target"]
        kind = dataset.features[target]
        if getattr(kind, "dtype", None) not in ("string", "large_string"):
            raise GlueError(f"target column {target!r} holds {kind} values, not text; name the target text column "
                            "with --target-column.")

        def encode(rows):
            return processor(rows[columns["text"]], text_target=rows[target], truncation=True,
                             max_length=data.max_length)

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorForSeq2Seq

        # without a model it builds no decoder_input_ids: the model shifts the labels itself (`model_inputs`)
        return DataCollatorForSeq2Seq(processor, label_pad_token_id=-100, return_tensors="pt")

    def model_inputs(self, batch: dict) -> dict:
        return dict(batch)  # labels included: T5 and BART build their decoder inputs from them (-100 → pad)

    def head_module(self, model):
        return None  # a language-model head: LogME does not apply

    def batch_stats(self, outputs, batch):
        logits = outputs.logits.float()
        labels = batch["labels"]
        mask = labels != -100
        return {
            "loss_sum": wide_sum(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="none")),
            "count": wide_sum(mask),
            "correct": wide_sum((logits.argmax(-1) == labels) & mask),
        }

    def finalize(self, sums):
        count = max(sums["count"], 1.0)
        loss = sums["loss_sum"] / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": sums["correct"] / count}

    def preprocess_logits_for_metrics(self):
        """Keep only the argmax token ids of the logits (the Trainer would otherwise gather every vocabulary
        logit, and the encoder states the model returns beside them)."""

        def reduce(logits, labels):
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            return logits.argmax(-1)

        return reduce

    def compute_metrics(self, model_config: dict):
        """A `Trainer` ``compute_metrics``: teacher-forced token accuracy (perplexity comes from the eval loss)."""

        def compute(eval_pred):
            predictions, labels = eval_pred
            if isinstance(predictions, (tuple, list)):
                predictions = predictions[0]
            mask = labels != -100
            return {"token_accuracy": float((predictions[mask] == labels[mask]).sum() / max(mask.sum(), 1))}

        return compute

    @torch.no_grad()
    def generation_metrics(self, model, dataset, processor, batch_size: int, max_new_tokens: int
                           ) -> Optional[dict[str, float]]:
        """Exact match, token F1 and ROUGE-L (bundled ``text_overlap``) of greedy generations on ``dataset``
        (preprocessed rows) against its decoded targets; at most as many new tokens as the longest target."""
        from ..metrics import load_metric
        from .data import make_loader

        longest = max((len(ids) for ids in dataset["labels"]), default=0)
        max_new_tokens = max(1, min(max_new_tokens, longest))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        predictions, references = [], []
        loader = make_loader(dataset, batch_size, self.collator(processor), shuffle=False)
        try:
            for batch in loader:
                labels = batch.pop("labels")
                inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
                predictions += processor.batch_decode(generated, skip_special_tokens=True)
                pad = processor.pad_token_id if processor.pad_token_id is not None else 0
                references += processor.batch_decode(labels.masked_fill(labels == -100, pad),
                                                     skip_special_tokens=True)
        finally:
            model.train(was_training)
        scores = load_metric("text_overlap").compute(predictions=predictions, references=references)
        return {k: float(v) for k, v in scores.items()}
