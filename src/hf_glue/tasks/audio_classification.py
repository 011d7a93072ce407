"""Audio classification (wav2vec2 / HuBERT family, AST, Whisper encoders) with the experts' feature extractor.

Columns: the audio (``audio``, ``speech``, ... or ``--audio-column``; see `tasks.audio` for the forms read) and a
label column, mapped to the experts' classes as in text classification. Loss and accuracy are classification's.

Every row's clip is checked in ``preprocess`` (rate, readability, long enough for the encoder) without decoding.
Experts whose feature extractor makes no attention mask (wav2vec2-base, HuBERT-base: ``feat_extract_norm="group"``,
``return_attention_mask=False``) read each batch's zero padding as signal: a clip's pooled features, and so its
prediction, depend on the lengths of the clips batched with it (as in transformers' own batched evaluation of such
models); hf-glue batches as they are and logs a note when the clips differ in length.
"""

from __future__ import annotations

from typing import Sequence

from ..config import DataConfig
from .audio import AUDIO_COLUMNS, AudioReader, check_clip, encode, feature_extractor_of, pad, warn_if_unmasked
from .base import pick_column, register_task
from .classification import ClassificationTask, label_mapper
from .text_classification import LABEL_COLUMNS


@register_task
class AudioClassification(ClassificationTask):
    """The head LogME reads is the default ``classifier``: in wav2vec2-style models its input is the utterance's
    pooled (``projector``-projected, mask-averaged) features, one vector per clip."""

    name = "audio-classification"
    pretty_name = "Audio classification"
    auto_model = "AutoModelForAudioClassification"
    pipeline_tag = "audio-classification"
    # wav2vec2, HuBERT, WavLM, ... name their audio classifiers *ForSequenceClassification; `supports` (the Auto
    # class's model types) keeps text classification and this task apart
    architecture_suffixes = ("ForAudioClassification", "ForSequenceClassification")

    def load_processor(self, path, trust_remote_code=False):
        from transformers import AutoFeatureExtractor

        return AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        return {
            "audio": pick_column("audio", data.audio_column, AUDIO_COLUMNS, column_names, "--audio-column"),
            "label": pick_column("label", data.label_column, LABEL_COLUMNS, column_names, "--label-column"),
        }

    def preprocess(self, dataset, processor, columns, data: DataConfig, model_config: dict):
        to_id = label_mapper(dataset, columns["label"], model_config)
        extractor = feature_extractor_of(processor)
        where = f"dataset {data.dataset!r}" + (f", split {str(dataset.split)!r}" if dataset.split else "")
        reader = AudioReader(dataset, columns["audio"], extractor.sampling_rate, where)
        warn_if_unmasked(extractor, *reader.check_rows(model_config))
        label_col, key = columns["label"], extractor.model_input_names[0]

        def transform(rows):  # lazily, batch by batch: audio is decoded only when used
            waves = reader.read(rows)
            for w in waves:
                check_clip(len(w), model_config, where, reader.rate)
            return {key: encode(extractor, waves), "labels": [to_id(v) for v in rows[label_col]]}

        return reader.dataset.select_columns(reader.columns() + [label_col]).with_transform(transform)

    def collator(self, processor):
        import torch

        extractor = feature_extractor_of(processor)
        key = extractor.model_input_names[0]

        def collate(rows):
            batch = pad(extractor, [r[key] for r in rows])
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
            return batch

        return collate
