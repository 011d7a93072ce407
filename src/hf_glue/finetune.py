"""Fine-tune the merged model with `transformers.Trainer` on the target train split; evaluate before and after."""

from __future__ import annotations

import math
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

import torch

from .config import FinetuneConfig, check_value, read_mapping_file
from .errors import GlueError
from .io.progress import on_terminal
from .tasks import Task
from .tracking import TrackingRun


def read_training_args(path: Optional[str]) -> dict:
    """Extra `TrainingArguments` fields from a JSON or YAML file, checked before any work: an unreadable file,
    unknown fields, or values of the wrong type (for fields of one simple type) are one error naming the file."""
    if not path:
        return {}
    from transformers import TrainingArguments

    values = read_mapping_file(Path(path), f"--training-args file {path!r}", "TrainingArguments fields")
    known = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GlueError(f"--training-args file {path!r}: {unknown} are not transformers.TrainingArguments fields.")
    hints = get_type_hints(TrainingArguments)  # building TrainingArguments here would set up devices too early
    return {k: check_value(f"{k} in --training-args file {path!r}", v, hints.get(k)) for k, v in values.items()}


def finetune(
    model,
    task: Task,
    processor,
    train_dataset,
    eval_dataset,
    config: FinetuneConfig,
    model_config: dict,
    seed: int = 0,
    cpu: bool = False,
    before: Optional[dict[str, float]] = None,
    tracking: Optional[TrackingRun] = None,
) -> tuple[Any, dict[str, float], dict[str, float], list[dict]]:
    """Train ``model`` in place for ``config.finetune_epochs``; returns (model, eval before, eval after, curve).

    ``curve`` holds the held-out metrics at each step the Trainer evaluated during training (with
    ``eval_strategy: steps`` in --training-args; empty otherwise): how fast a start reaches a given accuracy.
    ``before``: the start's held-out metrics when the caller has them already (no second evaluation).
    ``tracking``: the experiment trackers the Trainer logs to (--report-to)."""
    from transformers import Trainer, TrainingArguments

    overrides = read_training_args(config.training_args)
    reporting, callbacks = tracking.trainer_setup() if tracking is not None else ({}, [])
    with tempfile.TemporaryDirectory(prefix="hf-glue-finetune-") as tmp:
        values = {
            "output_dir": tmp,
            "num_train_epochs": config.finetune_epochs,
            "learning_rate": config.learning_rate,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "per_device_eval_batch_size": max(config.per_device_train_batch_size, 32),
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": "none",
            "seed": seed,
            "remove_unused_columns": False,
            "use_cpu": cpu,
            "logging_strategy": "epoch",
            "disable_tqdm": not on_terminal(),  # redirected: the Trainer logs a line per epoch instead of a bar
            "dataloader_pin_memory": not cpu and torch.cuda.is_available(),
            **reporting,
            **overrides,
        }
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**values),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=in_model_dtype(task.trainer_collator(processor), model),
            compute_metrics=task.compute_metrics(model_config, processor),
            preprocess_logits_for_metrics=task.preprocess_logits_for_metrics(),
            callbacks=callbacks,
        )
        def evaluate() -> dict[str, float]:
            if task.trainer_metrics_exact:
                return _clean(trainer.evaluate(), task)
            return task_metrics(model, task, eval_dataset, processor, values["per_device_eval_batch_size"])

        if before is None:
            before = evaluate()
        trainer.train()
        curve = [{"step": entry["step"], **_clean(entry, task)} for entry in trainer.state.log_history
                 if "eval_loss" in entry]
        if task.trainer_metrics_exact and curve and curve[-1]["step"] == trainer.state.global_step:
            after = {k: v for k, v in curve[-1].items() if k != "step"}  # evaluated at the last step already
        else:
            after = evaluate()
    model.eval()
    return model, before, after, curve


@torch.no_grad()
def task_metrics(model, task: Task, dataset, processor, batch_size: int) -> dict[str, float]:
    """Held-out metrics of a whole model from the task's own per-batch sums: what the search reports."""
    from .tasks.data import make_loader, to_device

    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    for batch in make_loader(dataset, batch_size, in_model_dtype(task.collator(processor), model), shuffle=False):
        batch = to_device(batch, device)
        for key, value in task.batch_stats(model(**task.model_inputs(batch)), batch).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {k: float(v) for k, v in task.finalize(sums).items()}


def in_model_dtype(collate, model):
    """``collate`` with its floating inputs (pixel values, audio samples) cast to a half-precision model's dtype:
    a bfloat16 vision or speech model refuses float32 inputs (labels keep their dtype)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype not in (torch.bfloat16, torch.float16):
        return collate

    def cast(rows):
        batch = collate(rows)
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "labels" else v
                for k, v in batch.items()}
    return cast


def _clean(metrics: dict, task: Task) -> dict[str, float]:
    """Trainer's ``eval_*`` metrics as ``{loss, accuracy, f1}`` / ``{loss, perplexity}``."""
    out = {k[len("eval_"):]: float(v) for k, v in metrics.items()
           if k.startswith("eval_") and not k.endswith(("runtime", "per_second", "epoch", "preparation_time"))}
    if task.primary_metric == "perplexity" and "loss" in out:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out
