"""Fine-tuning for building a setup (its base and experts): the Trainer, with hf-glue's own preprocessing, so the
experts see their data exactly as the merge's target data is seen."""

from __future__ import annotations

import tempfile

from hf_glue.config import DataConfig
from hf_glue.tasks import detect_task

import data


def train_model(model, processor, rows: list[dict], *, epochs: float, lr: float, batch_size: int, seed: int,
                max_length: int = 0) -> None:
    """Train ``model`` in place on ``rows`` ({text|image, label}) with `transformers.Trainer`."""
    from transformers import Trainer, TrainingArguments

    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    task = detect_task(config, None)
    data_config = DataConfig(max_length=max_length or None)
    dataset = data.to_dataset(rows)
    columns = task.resolve_columns(dataset.column_names, data_config)
    dataset = task.preprocess(dataset, processor, columns, data_config, config)
    with tempfile.TemporaryDirectory(prefix="hf-glue-experiments-") as tmp:
        args = TrainingArguments(output_dir=tmp, num_train_epochs=epochs, learning_rate=lr, seed=seed,
                                 per_device_train_batch_size=batch_size, save_strategy="no", report_to="none",
                                 remove_unused_columns=False, use_cpu=True, logging_strategy="no",
                                 disable_tqdm=True, dataloader_pin_memory=False)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=task.collator(processor)).train()
    model.eval()
