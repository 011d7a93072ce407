"""Sequence-to-sequence LM (T5, BART, Marian): loss on labels; a generation-based metric for evaluation.

The search minimises the teacher-forced loss of the target tokens, and reports perplexity and token accuracy. The
model gets the decoder inputs (``decoder_input_ids``: each target shifted right after the decoder's start token, as
the model would shift ``labels``), never the labels: given them, it would compute a loss of its own that the search
does not use. The merged model's held-out evaluation adds exact match, token F1 and ROUGE-L of greedy `generate`
outputs (`generation_metrics`, bundled ``text_overlap`` module).
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
#: model types whose decoder starts from the target's last token (its language code or end of sequence), not from
#: ``decoder_start_token_id`` (their ``shift_tokens_right``)
LAST_TOKEN_START = ("mbart", "plbart", "fsmt")


def decoder_inputs(target: Sequence[int], start: Optional[int]) -> list[int]:
    """A target's decoder inputs: its tokens shifted right after ``start`` (None: after its own last token)."""
    first = list(target[-1:]) if start is None else [start]
    return (first + list(target))[: len(target)]


@register_task
class Seq2SeqLM(Task):
    name = "seq2seq"
    pretty_name = "Sequence-to-sequence generation"
    auto_model = "AutoModelForSeq2SeqLM"
    pipeline_tag = "text2text-generation"
    architecture_suffixes = ("ForConditionalGeneration", "MTModel")
    #: what the search optimises (as causal-lm); the generation metrics come only with the final evaluation
    primary_metric = "perplexity"
    greater_is_better = False
    #: the Trainer averages each eval batch's mean token loss over rows, not over tokens: with targets of unequal
    #: lengths its loss differs from the search's per-token one, so before/after come from the task's sums
    trainer_metrics_exact = False

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

        start = None
        if model_config.get("model_type") not in LAST_TOKEN_START:
            start = model_config.get("decoder_start_token_id")
            if start is None:
                raise GlueError("the experts' config has no decoder_start_token_id: the token their decoder starts "
                                "from is needed to build its inputs.")

        def encode(rows):
            enc = processor(rows[columns["text"]], text_target=rows[target], truncation=True,
                            max_length=data.max_length)
            enc["decoder_input_ids"] = [decoder_inputs(ids, start) for ids in enc["labels"]]
            return enc

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorForSeq2Seq

        pad = DataCollatorForSeq2Seq(processor, label_pad_token_id=-100, return_tensors="pt")
        pad_id, right = processor.pad_token_id, processor.padding_side == "right"

        def collate(rows):
            batch = pad([{k: v for k, v in r.items() if k != "decoder_input_ids"} for r in rows])
            width = batch["labels"].shape[1]  # padded on the labels' side: position t still predicts label t
            batch["decoder_input_ids"] = torch.tensor(
                [ids + [pad_id] * (width - len(ids)) if right else [pad_id] * (width - len(ids)) + ids
                 for ids in (r["decoder_input_ids"] for r in rows)], dtype=torch.long)
            return batch

        return collate

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

    def compute_metrics(self, model_config: dict, processor):
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
