"""Image classification with the experts' image processor (ViT, ResNet, ...)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import DataConfig
from .base import pick_column, register_task
from .classification import ClassificationTask, label_mapper
from .text_classification import LABEL_COLUMNS

IMAGE_COLUMNS = ("image", "img", "picture", "photo")


@register_task
class ImageClassification(ClassificationTask):
    name = "image-classification"
    pretty_name = "Image classification"
    auto_model = "AutoModelForImageClassification"
    pipeline_tag = "image-classification"
    architecture_suffixes = ("ForImageClassification",)

    def load_processor(self, path, trust_remote_code=False):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        return {
            "image": pick_column("image", data.image_column, IMAGE_COLUMNS, column_names, "--image-column"),
            "label": pick_column("label", data.label_column, LABEL_COLUMNS, column_names, "--label-column"),
        }

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        to_id = label_mapper(dataset, columns["label"], model_config)
        image_col, label_col = columns["image"], columns["label"]

        def transform(rows):  # lazily, batch by batch: images are decoded only when used
            images = [img.convert("RGB") for img in rows[image_col]]
            return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                    "labels": [to_id(v) for v in rows[label_col]]}

        return dataset.select_columns([image_col, label_col]).with_transform(transform)

    def collator(self, processor):
        def collate(rows):
            return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                    "labels": torch.tensor([r["labels"] for r in rows])}

        return collate
