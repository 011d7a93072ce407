"""The target dataset: resolved like an expert (pinned snapshot), loaded with `datasets`, split, batched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..io import hub
from ..config import DataConfig
from ..errors import GlueError

DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
EVAL_SPLIT_NAMES = ("validation", "valid", "dev", "test")


@dataclass
class TargetData:
    """The target's train and held-out splits (raw rows) and where they came from."""

    spec: str
    repo: Optional[hub.ResolvedRepo]
    train: "object"
    eval: "object"
    train_split: str
    eval_split: str

    @property
    def column_names(self) -> list[str]:
        return list(self.train.column_names)

    def to_dict(self) -> dict:
        repo_id, revision = (self.repo.repo_id, self.repo.revision) if self.repo else (self.spec, None)
        return {"id": repo_id, "revision": revision, "train_split": self.train_split, "eval_split": self.eval_split}


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
            builder = DATA_FILE_BUILDERS.get(local.suffix)
            if builder is None:
                raise GlueError(f"dataset file {spec!r}: unsupported type; use one of {sorted(DATA_FILE_BUILDERS)}.")
            loaded = datasets.load_dataset(builder, data_files={data.train_split: str(local)})
        else:
            repo = hub.resolve(spec, repo_type="dataset", what="dataset")
            loaded = datasets.load_dataset(str(repo.path), name=data.dataset_config)
    except GlueError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise GlueError(f"dataset {spec!r} could not be loaded: {err}") from None
    train = _split(loaded, spec, data.train_split, "--train-split")
    if data.eval_split:
        eval_split, held_out = data.eval_split, _split(loaded, spec, data.eval_split, "--eval-split")
    else:
        eval_split = next((s for s in EVAL_SPLIT_NAMES if s in loaded and s != data.train_split), None)
        if eval_split:
            held_out = loaded[eval_split]
        else:  # no held-out split: keep 10% of train aside, deterministically
            parts = train.train_test_split(test_size=0.1, seed=seed)
            train, held_out = parts["train"], parts["test"]
            eval_split = f"{data.train_split}[10% held out, seed {seed}]"
    if data.max_train_samples:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if data.max_eval_samples:
        held_out = held_out.select(range(min(data.max_eval_samples, len(held_out))))
    if len(train) == 0:
        raise GlueError(f"dataset {spec!r}: split {data.train_split!r} is empty.")
    return TargetData(spec, repo, train, held_out, data.train_split, eval_split)


def _split(loaded, spec: str, name: str, flag: str):
    if name not in loaded:
        raise GlueError(f"dataset {spec!r} has no split {name!r}; its splits are: {', '.join(loaded)}. "
                        f"Name one with {flag}.")
    return loaded[name]


def make_loader(dataset, batch_size: int, collate_fn, *, shuffle: bool, seed: int = 0):
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator,
                      drop_last=shuffle and len(dataset) >= batch_size)


def cycle(loader) -> Iterator[dict]:
    """Endless batches: epoch after epoch (a seeded sampler reshuffles each epoch deterministically)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise GlueError("the target train split yields no batches: it has fewer rows than one batch.")
