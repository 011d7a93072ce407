"""Audio columns read as float32 mono waveforms at the experts' feature-extractor sampling rate.

Three cell forms are read:

- plain float arrays (``list<float>``), at the feature extractor's rate; an optional ``sampling_rate`` column
  must say that rate on every row (nothing is resampled);
- ``{"array": [...], "sampling_rate": N}`` structs (a decoded `datasets.Audio` cell written out as data);
- a `datasets.Audio` column: cast to ``Audio(decode=False)`` and its WAV files or bytes read with the standard
  library's `wave` (PCM 8/16/24/32-bit, mono or downmixed). Other formats, and WAV at another sampling rate, are
  decoded (and resampled) by torchcodec when it is installed; without it they are refused naming the file.

Decoding is lazy (`Dataset.with_transform`, batch by batch), but every row is checked in ``preprocess``
(`AudioReader.check_rows`), before the search starts and on every process alike, without decoding samples: WAV
headers and array lengths give each clip's rate and length, so a wrong rate, an unreadable file or a clip too
short for the experts' encoder is refused there, naming the split, row and column. Rows only torchcodec reads
(other formats, WAV at another rate) are measured as they are decoded.

Raw-waveform models whose feature extractor makes no attention mask (wav2vec2-base, HuBERT-base: conv encoders
with ``feat_extract_norm="group"``) read each batch's zero padding as signal, so a clip's outputs depend on the
lengths of the clips batched with it; ``preprocess`` logs this once when the clips differ in length.
"""

from __future__ import annotations

import functools
import io
import logging
import wave
from typing import Any, Optional

import numpy as np

from ..errors import GlueError
from .data import source_row

logger = logging.getLogger(__name__)
AUDIO_COLUMNS = ("audio", "speech", "waveform", "wav")
RATE_COLUMN = "sampling_rate"
_TORCHCODEC = "install torchcodec and ffmpeg (pip install torchcodec; apt-get install ffmpeg) to read other formats"


def _has_torchcodec() -> bool:
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # missing, or its ffmpeg libraries are
        return False
    return True


def frame_count(model_config: dict, samples):
    """How many output frames a convolutional feature encoder (wav2vec2, HuBERT, WavLM, ...) makes of ``samples``
    input samples (an int, or a numpy array of them): transformers' ``_get_feat_extract_output_lengths`` from the
    config alone (None without one)."""
    kernels, strides = model_config.get("conv_kernel"), model_config.get("conv_stride")
    if not kernels or not strides:
        return None
    length = samples
    for kernel, stride in zip(kernels, strides):
        length = (length - kernel) // stride + 1
    if model_config.get("add_adapter"):
        for _ in range(int(model_config.get("num_adapter_layers", 0))):
            length = (length - 1) // int(model_config.get("adapter_stride", 1)) + 1
    return length


class AudioReader:
    """Reads one column of a dataset as waveforms at ``rate`` Hz; ``where`` names the dataset in errors."""

    def __init__(self, dataset, column: str, rate: int, where: str) -> None:
        import datasets
        import pyarrow as pa

        self.column, self.rate, self.where = column, int(rate), where
        feature = dataset.features.get(column)
        arrow_type = dataset.data.schema.field(column).type
        self.rate_column = None
        if isinstance(feature, datasets.Audio):
            self.kind = "audio"
            dataset = dataset.cast_column(column, datasets.Audio(decode=False))
        elif pa.types.is_struct(arrow_type) and arrow_type.get_field_index("array") >= 0:
            self.kind = "struct"
        elif (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and (
                pa.types.is_floating(arrow_type.value_type) or pa.types.is_integer(arrow_type.value_type)):
            self.kind = "array"
            if RATE_COLUMN in dataset.column_names and RATE_COLUMN != column:
                self.rate_column = RATE_COLUMN
        else:
            raise GlueError(f"{where}: column {column!r} holds {arrow_type} values, not audio; give a datasets "
                            "Audio column, or float arrays (list<float>) at the experts' sampling rate "
                            f"({self.rate} Hz). Name the audio column with --audio-column.")
        self.dataset = dataset

    def _at(self, row: Optional[int]) -> str:
        return self.where if row is None else f"{self.where}, row {source_row(self.dataset, row) + 1}"

    def _rate_message(self, what: str, rate, plain: bool = False, row: Optional[int] = None) -> str:
        how = ("resample it first (hf-glue does not resample plain arrays)" if plain else
               "resample it first, or install torchcodec and ffmpeg (pip install torchcodec), with which hf-glue "
               "resamples while decoding")
        return (f"{self._at(row)}: {what} {rate} Hz for the audio in column {self.column!r}, but the experts' "
                f"feature extractor expects {self.rate} Hz; {how}.")

    def check_rows(self, model_config: dict) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Every row's clip length in samples (-1 where only torchcodec can tell) and frame count (None for
        encoders that are not convolutional; -1 where the length is unknown), read without decoding samples: WAV
        headers, array lengths from pyarrow. Refuses, naming the first such row, a rate other than the experts',
        an unreadable file (without torchcodec) and a clip too short to make one frame."""
        batches = self.dataset.select_columns(self.columns()).with_format("arrow").iter(batch_size=1024)
        counts, start = [], 0
        for table in batches:
            if self.kind == "audio":
                counts.append(np.array([self._wav_length(cell, start + i)
                                        for i, cell in enumerate(table.column(self.column))], dtype=np.int64))
            else:
                counts.append(self._array_lengths(table, start))
            start += table.num_rows
        counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
        frames = frame_count(model_config, counts)
        if frames is None:
            return counts, None
        known = counts >= 0
        short = np.flatnonzero(known & (frames < 1))
        if short.size:
            row, samples = int(short[0]), int(counts[short[0]])
            raise GlueError(f"{self._at(row)}: the audio clip in column {self.column!r} has {samples} samples "
                            f"({samples / self.rate:.4f} s), shorter than the experts' convolutional encoder reads "
                            "(it makes no output frame); drop such clips.")
        return counts, np.where(known, frames, -1)

    def _array_lengths(self, table, start: int) -> np.ndarray:
        """The lengths of a batch of array or struct cells (the first channel's of ``[channels, samples]``
        arrays), their rates checked."""
        import pyarrow as pa
        import pyarrow.compute as pc

        cells, rates = table.column(self.column), None
        if self.kind == "struct":
            if cells.type.get_field_index(RATE_COLUMN) >= 0:
                rates, what = pc.struct_field(cells, RATE_COLUMN), f"the {RATE_COLUMN!r} field gives"
            cells = pc.struct_field(cells, "array")
        elif self.rate_column:
            rates, what = table.column(self.rate_column), f"column {RATE_COLUMN!r} gives"
        if rates is not None:
            bad = pc.index(pc.not_equal(rates, self.rate), True).as_py()
            if bad >= 0:
                raise GlueError(self._rate_message(what, rates[bad].as_py(), plain=True, row=start + bad))
        if pa.types.is_list(cells.type.value_type) or pa.types.is_large_list(cells.type.value_type):
            cells = pc.list_element(cells, 0)
        return pc.list_value_length(cells).to_numpy(zero_copy_only=False).astype(np.int64)

    def _wav_length(self, cell, row: int) -> int:
        """A `datasets` Audio cell's frame count from its WAV header (-1 for a file torchcodec will decode)."""
        import pyarrow as pa

        data, path = cell["bytes"], cell["path"].as_py()
        name = path or "embedded audio bytes"
        source = pa.BufferReader(data.as_buffer()) if data.is_valid and len(data.as_buffer()) else path
        if source is None:
            raise GlueError(f"{self._at(row)}: column {self.column!r} has neither audio bytes nor a path.")
        try:
            with wave.open(source, "rb") as w:
                width, rate, frames = w.getsampwidth(), w.getframerate(), w.getnframes()
            if width not in (1, 2, 3, 4):
                raise wave.Error(f"unsupported sample width of {width} bytes")
        except FileNotFoundError:
            raise GlueError(f"{self._at(row)}: audio file {name!r} (column {self.column!r}) does not exist."
                            ) from None
        except (wave.Error, EOFError, ValueError) as err:  # not a PCM WAV file (or a truncated one)
            if _has_torchcodec():
                return -1
            raise GlueError(f"{self._at(row)}: cannot decode audio file {name!r} (column {self.column!r}): {err}. "
                            f"Without torchcodec only PCM WAV files are read; {_TORCHCODEC}.") from None
        if rate != self.rate:
            if _has_torchcodec():
                return -1
            raise GlueError(self._rate_message(f"audio file {name!r} is sampled at", rate, row=row))
        return frames

    def columns(self) -> list[str]:
        return [self.column] + ([self.rate_column] if self.rate_column else [])

    def read(self, rows: dict) -> list[np.ndarray]:
        """The waveforms of a batch of rows (a column → values mapping, as `with_transform` gives)."""
        return [self.read_cell(cell) for cell in rows[self.column]]

    def read_cell(self, cell: Any) -> np.ndarray:
        if self.kind == "array":
            return np.asarray(cell, dtype=np.float32)
        if self.kind == "struct":
            rate = cell.get("sampling_rate")
            if rate is not None and int(rate) != self.rate:
                raise GlueError(self._rate_message("a row's sampling_rate is", rate, plain=True))
            return _mono(np.asarray(cell["array"], dtype=np.float32))
        return self._decode(cell)

    def _decode(self, cell: dict) -> np.ndarray:
        data, path = cell.get("bytes"), cell.get("path")
        name = path or "embedded audio bytes"
        source = io.BytesIO(data) if data else path
        if source is None:
            raise GlueError(f"{self.where}: a row of column {self.column!r} has neither audio bytes nor a path.")
        try:
            wave_data, rate = read_wav(source)
        except FileNotFoundError:
            raise GlueError(f"{self.where}: audio file {name!r} (column {self.column!r}) does not exist.") from None
        except (wave.Error, EOFError, ValueError) as err:  # not a PCM WAV file (or a truncated one)
            if _has_torchcodec():
                return self._torchcodec(data or path, name)
            raise GlueError(f"{self.where}: cannot decode audio file {name!r} (column {self.column!r}): {err}. "
                            f"Without torchcodec only PCM WAV files are read; {_TORCHCODEC}.") from None
        if rate != self.rate:
            if _has_torchcodec():
                return self._torchcodec(data or path, name)
            raise GlueError(self._rate_message(f"audio file {name!r} is sampled at", rate))
        return wave_data

    def _torchcodec(self, source, name: str) -> np.ndarray:
        from torchcodec.decoders import AudioDecoder

        try:
            samples = AudioDecoder(source, sample_rate=self.rate).get_all_samples()
        except Exception as err:  # torchcodec raises RuntimeError/ValueError for undecodable input
            raise GlueError(f"{self.where}: cannot decode audio file {name!r} (column {self.column!r}): "
                            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                            ) from None
        return samples.data.float().mean(dim=0).numpy()


def read_wav(source) -> tuple[np.ndarray, int]:
    """A PCM WAV file (path or file object) as float32 mono samples in [-1, 1) and its sampling rate."""
    with wave.open(source, "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 2.0 ** 15
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / 2.0 ** 23
    elif width == 4:
        samples = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0 ** 31).astype(np.float32)
    else:
        raise wave.Error(f"unsupported sample width of {width} bytes")
    usable = len(samples) // channels * channels
    return samples[:usable].reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def write_wav(path_or_file, samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> None:
    """Write float samples in [-1, 1] as a PCM WAV file (``width`` 1, 2 or 4 bytes; the mono signal repeated on
    ``channels`` channels)."""
    x = np.clip(np.asarray(samples, dtype=np.float64), -1.0, 1.0 - 2.0 ** -15)
    if width == 1:
        data = np.round(x * 127 + 128).astype(np.uint8)
    elif width == 2:
        data = np.round(x * 2 ** 15).astype("<i2")
    elif width == 4:
        data = np.round(x * 2 ** 31).clip(-2 ** 31, 2 ** 31 - 1).astype("<i4")
    else:
        raise ValueError(f"width {width} not supported")
    data = np.repeat(data[:, None], channels, axis=1)
    with wave.open(path_or_file, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


def _mono(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0) if x.ndim == 2 else x


def check_clip(samples: int, model_config: dict, where: str, rate: int) -> Optional[int]:
    """The clip's frame count (None for encoders that are not convolutional); refuses a clip shorter than the
    encoder's receptive field (it would make no frame at all)."""
    frames = frame_count(model_config, samples)
    if frames is not None and frames < 1:
        raise GlueError(f"{where}: an audio clip of {samples} samples ({samples / rate:.4f} s) is shorter than the "
                        "experts' convolutional encoder reads (it makes no output frame); drop such clips.")
    return frames


def warn_if_unmasked(extractor, counts: np.ndarray, frames: Optional[np.ndarray]) -> None:
    """Log once that outputs depend on batch neighbours where a convolutional raw-waveform encoder's feature
    extractor makes no attention mask and the clips differ in length."""
    if frames is not None and not getattr(extractor, "return_attention_mask", True) and \
            np.unique(counts[counts >= 0]).size > 1:
        _warn_unmasked(type(extractor).__name__)


@functools.lru_cache(maxsize=None)
def _warn_unmasked(extractor: str) -> None:
    logger.warning("note: the experts' feature extractor (%s) makes no attention mask (wav2vec2-base / HuBERT-base "
                   "style models): each batch is zero-padded to its longest clip and the model reads the padding, so "
                   "a clip's outputs, and the scores, depend slightly on which clips are batched with it.", extractor)


def feature_extractor_of(processor):
    """The feature extractor itself, or the one inside a processor (``Wav2Vec2Processor``)."""
    return getattr(processor, "feature_extractor", processor)


def encode(feature_extractor, waves: list[np.ndarray]) -> list:
    """The model input (``input_values`` or ``input_features``) of each waveform, unpadded (padding is per batch,
    in the collator)."""
    key = feature_extractor.model_input_names[0]
    return list(feature_extractor(waves, sampling_rate=feature_extractor.sampling_rate)[key])


def pad(feature_extractor, values: list) -> dict:
    """A batch: the inputs padded to the longest, with an attention mask where the feature extractor makes one
    (wav2vec2-base-like extractors do not: the model is not meant to get one)."""
    key = feature_extractor.model_input_names[0]
    return dict(feature_extractor.pad([{key: v} for v in values], return_tensors="pt"))
