"""The target dataset: resolved like an expert (pinned snapshot), loaded with `datasets`, split, batched.

Files that cannot be read, empty splits and missing cells are refused in one line naming the file, split, row and
column.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..io import hub
from ..config import DataConfig
from ..errors import GlueError

DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
EVAL_SPLIT_NAMES = ("validation", "valid", "dev", "test")
#: Column roles whose cells are structured (an image, an audio clip, a list of words or tags), not scalars.
NESTED_ROLES = ("image", "audio", "tokens", "tags")


@dataclass
class TargetData:
    """The target's train and held-out splits (raw rows) and where they came from."""

    spec: str
    repo: Optional[hub.ResolvedRepo]
    train: "object"
    eval: "object"
    train_split: str
    eval_split: str
    #: the splits as loaded (before hold-out and --max-*-samples), whose row numbers match the source
    sources: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def column_names(self) -> list[str]:
        return list(self.train.column_names)

    def check_cells(self, columns: dict[str, str]) -> None:
        """Refuse a missing (empty, null, NaN) cell in a column the task reads, or a text column that does not
        hold text, naming split, row and column."""
        for split, rows in self.sources.items():
            for role, column in columns.items():
                _check_column(self.spec, split, rows, column, role)

    def to_dict(self) -> dict:
        repo_id, revision = (self.repo.repo_id, self.repo.revision) if self.repo else (self.spec, None)
        return {"id": repo_id, "revision": revision, "train_split": self.train_split, "eval_split": self.eval_split}


#: files `datasets`' AudioFolder reads as audio
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aiff")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")


#: split folder names `datasets` recognises, as the split they name
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test", "eval": "test",
                 "evaluation": "test", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation"}
#: files that make a folder another kind of dataset (metadata files aside)
DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".tsv", ".txt")


def load_audio_folder(folder: Path, spec: str, config: Optional[str] = None):
    """A dataset in `datasets`' AudioFolder layout (audio files and a ``metadata.csv``/``.jsonl`` naming them in
    ``file_name``; one metadata file at the top, or one per split folder: train, test, validation, ...) as a
    DatasetDict whose ``audio`` column is an undecoded `datasets.Audio` (path per row): `datasets` itself would
    encode every file with torchcodec, which does not even import with a CPU build of torch; hf-glue reads the WAVs
    with `wave`. None for any other layout (data files beside the audio, a named --dataset-config, a metadata file
    without file_name, an unknown split folder): `datasets` loads those."""
    import datasets
    import pandas as pd
    import pyarrow as pa

    folder = Path(folder)
    if config is not None or not folder.is_dir():
        return None
    files = [f for f in folder.rglob("*") if f.is_file() and ".git" not in f.parts and ".cache" not in f.parts]
    if not any(f.suffix.lower() in AUDIO_SUFFIXES for f in files) or any(
            f.suffix.lower() in DATA_SUFFIXES and f.name not in METADATA_FILES for f in files):
        return None
    tops = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if tops:
        places = {None: tops[0]}
    else:
        places = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            metadata = next((sub / m for m in METADATA_FILES if (sub / m).is_file()), None)
            if metadata is None:
                continue
            if sub.name.lower() not in SPLIT_FOLDERS:
                return None
            places[SPLIT_FOLDERS[sub.name.lower()]] = metadata
    if not places:
        return None
    frames: dict[str, list] = {}
    for split, metadata in places.items():
        frame = (pd.read_json(metadata, lines=True, dtype=False, convert_dates=False) if metadata.suffix == ".jsonl"
                 else pd.read_csv(metadata, keep_default_na=False))
        if "file_name" not in frame.columns:
            return None
        names = [str(name) for name in frame.pop("file_name")]
        paths = [metadata.parent / name for name in names]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise GlueError(f"dataset {spec!r}: {metadata.relative_to(folder)} names {str(missing.relative_to(folder))!r}, "
                            "which is not in the folder.")
        # a top-level metadata file may name files in split folders (train/x.wav): those rows are that split's
        row_splits = [split if split is not None else
                      SPLIT_FOLDERS.get(Path(name).parts[0].lower() if len(Path(name).parts) > 1 else "", "train")
                      for name in names]
        for name in sorted(set(row_splits)):
            keep = [i for i, s in enumerate(row_splits) if s == name]
            frames.setdefault(name, []).append((frame.iloc[keep].reset_index(drop=True), [paths[i] for i in keep]))
    splits = {}
    for split, parts in frames.items():
        frame = pd.concat([f for f, _ in parts], ignore_index=True)
        paths = [p for _, ps in parts for p in ps]
        table = pa.Table.from_pandas(frame, preserve_index=False).append_column(
            "audio", pa.array([{"bytes": None, "path": str(p)} for p in paths],
                              type=pa.struct({"bytes": pa.binary(), "path": pa.string()})))
        splits[split] = datasets.Dataset(table).cast_column("audio", datasets.Audio(decode=False))
    return datasets.DatasetDict(splits)


def load_target(data: DataConfig, seed: int = 0) -> TargetData:
    """Resolve and load the dataset, then pick the train split and a held-out split."""
    if not data.dataset:
        raise GlueError("no target dataset: pass --dataset ORG/NAME (a Hub dataset repo), a local folder or a file.")
    import datasets

    spec = data.dataset
    local = Path(spec).expanduser()
    repo = None
    try:
        if local.is_file():
            builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise GlueError(f"dataset file {spec!r}: unsupported type; use one of {sorted(DATA_FILE_BUILDERS)}.")
            _check_file(local, spec, builder)
            with _quiet_datasets():
                loaded = datasets.load_dataset(builder, data_files={data.train_split: str(local)})
        else:
            repo = hub.resolve(spec, repo_type="dataset", what="dataset")
            with _quiet_datasets():
                loaded = (load_audio_folder(repo.path, spec, data.dataset_config)
                          or datasets.load_dataset(str(repo.path), name=data.dataset_config))
    except GlueError:
        raise
    except (ValueError, TypeError, OSError, datasets.exceptions.DatasetsError) as err:
        empty = re.search(r'Instruction "(.+)" corresponds to no data', str(err))
        if empty:
            raise GlueError(f"dataset {spec!r}: split {empty.group(1)!r} has no rows (an empty file, or only a "
                            "header).") from None
        raise GlueError(f"dataset {spec!r} could not be loaded: {_root_cause(err)}") from None
    train = _split(loaded, spec, data.train_split, "--train-split")
    sources = {data.train_split: train}
    if data.eval_split:
        eval_split, held_out = data.eval_split, _split(loaded, spec, data.eval_split, "--eval-split")
        sources[eval_split] = held_out
    else:
        eval_split = next((s for s in EVAL_SPLIT_NAMES if s in loaded and s != data.train_split), None)
        if eval_split:
            held_out = sources[eval_split] = loaded[eval_split]
        else:  # no held-out split: keep 10% of train aside, deterministically
            if len(train) < 2:
                raise GlueError(f"dataset {spec!r}: split {data.train_split!r} has {len(train)} row(s), too few to "
                                "hold a tenth out for evaluation; add rows or name a held-out split with --eval-split.")
            parts = train.train_test_split(test_size=0.1, seed=seed)
            train, held_out = parts["train"], parts["test"]
            eval_split = f"{data.train_split}[10% held out, seed {seed}]"
    if data.max_train_samples:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if data.max_eval_samples:
        held_out = held_out.select(range(min(data.max_eval_samples, len(held_out))))
    for name, rows in ((data.train_split, train), (eval_split, held_out)):
        if len(rows) == 0:
            raise GlueError(f"dataset {spec!r}: split {name!r} has no rows.")
    return TargetData(spec, repo, train, held_out, data.train_split, eval_split, sources)


def _check_file(path: Path, spec: str, builder: str) -> None:
    """Refuse, before `datasets` reads it, a data file without rows (empty, blank or a CSV header alone)."""
    if builder == "parquet":
        return
    if path.stat().st_size == 0:
        raise GlueError(f"dataset file {spec!r} is empty.")
    with path.open("rb") as f:
        lines = list(itertools.islice((line for line in f if line.strip()), 2))
    if not lines:
        raise GlueError(f"dataset file {spec!r} holds only blank lines.")
    if builder == "csv" and len(lines) == 1:
        raise GlueError(f"dataset file {spec!r} has a header ({lines[0].strip().decode(errors='replace')[:80]}) "
                        "but no rows.")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets`' own error log while it reads: its failures become one `GlueError` line instead."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(err: BaseException) -> str:
    """The innermost cause of a loading failure, in one line (`datasets` wraps parser errors in its own)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _check_column(spec: str, split: str, rows, column: str, role: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.features import Json

    where = f"dataset {spec!r}, split {split!r}"
    missing = (f"{where}: row {{}} has no value in column {column!r} (empty, null, NaN or a missing field); fill "
               "or drop such rows.")
    if isinstance(rows.features.get(column), Json):  # `datasets` keeps a column of mixed types as JSON
        cells = rows[column]
        bad = next((i for i, v in enumerate(cells) if v is None), None)
        if bad is not None:
            raise GlueError(missing.format(bad + 1))
        bad = next((i for i, v in enumerate(cells) if type(v) is not type(cells[0])), None)
        if bad is not None:
            raise GlueError(f"{where}: column {column!r} mixes types (row 1 holds {type(cells[0]).__name__}, row "
                            f"{bad + 1} {type(cells[bad]).__name__}); give every row the same type.")
        raise GlueError(f"{where}: column {column!r} holds nested values ({type(cells[0]).__name__}), not the "
                        f"{role.replace('_', ' ')} the task reads.")
    values = rows.with_format("arrow")[column]
    bad = pc.index(pc.is_null(values, nan_is_null=True), True).as_py()
    if bad >= 0:
        raise GlueError(missing.format(bad + 1))
    if role not in NESTED_ROLES and pa.types.is_nested(values.type):
        raise GlueError(f"{where}: column {column!r} holds nested values ({values.type}), not the "
                        f"{role.replace('_', ' ')} the task reads.")
    if not role.startswith("text"):
        return
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise GlueError(f"{where}: column {column!r} holds {values.type} values, not text; name the text column "
                        f"with --{role.replace('_', '-')}-column.")
    bad = pc.index(pc.equal(pc.utf8_trim_whitespace(values), ""), True).as_py()
    if bad >= 0:
        raise GlueError(f"{where}: row {bad + 1} has blank text in column {column!r}; fill or drop such rows.")


def _split(loaded, spec: str, name: str, flag: str):
    if name not in loaded:
        raise GlueError(f"dataset {spec!r} has no split {name!r}; its splits are: {', '.join(loaded)}. "
                        f"Name one with {flag}.")
    return loaded[name]


def source_row(dataset, position: int) -> int:
    """The 0-based row of the split as loaded behind ``position`` in ``dataset``: a held-out carve-out or a
    --max-*-samples selection reorders rows through an indices mapping, and errors must name the file's row."""
    indices = getattr(dataset, "_indices", None)
    return int(indices.column(0)[position].as_py()) if indices is not None else position


#: fewest train rows held apart for validation (when the train split has at least twice as many)
MIN_VALIDATION_ROWS = 8
#: most rows candidates are scored on (each candidate costs a forward pass over them)
MAX_VALIDATION_ROWS = 256


def validation_rows(rows: int, fraction: float) -> int:
    """How many of ``rows`` train rows the search holds apart: ``fraction`` of them, at least
    `MIN_VALIDATION_ROWS`, at most half and at most `MAX_VALIDATION_ROWS` (0 when ``fraction`` is 0)."""
    if fraction <= 0:
        return 0
    return min(max(round(fraction * rows), MIN_VALIDATION_ROWS), rows // 2, MAX_VALIDATION_ROWS)


def split_validation(dataset, rows: int, seed: int):
    """``dataset`` as (search rows, ``rows`` validation rows), drawn by ``seed``, each in the split's order."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.select(sorted(order[rows:])), dataset.select(sorted(order[:rows]))


def make_loader(dataset, batch_size: int, collate_fn, *, shuffle: bool, seed: int = 0):
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator,
                      drop_last=shuffle and len(dataset) >= batch_size)


def to_device(batch: dict, device) -> dict:
    """A batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def cycle(loader) -> Iterator[dict]:
    """Endless batches: epoch after epoch (a seeded sampler reshuffles each epoch deterministically)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise GlueError("the target train split yields no batches: it has fewer rows than one batch.")
