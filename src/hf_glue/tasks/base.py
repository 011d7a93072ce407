"""The task interface: how a task family maps dataset columns to model inputs and scores a batch.

Scores are returned as sums (loss_sum, count, ...) so they reduce exactly across processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from ..config import DataConfig
from ..errors import GlueError

_TASKS: dict[str, "Task"] = {}


class Task(ABC):
    """One task family: sequence classification, causal LM, image classification, ..."""

    name: ClassVar[str]
    pretty_name: ClassVar[str]
    auto_model: ClassVar[str]  # the transformers Auto class name
    pipeline_tag: ClassVar[str]
    architecture_suffixes: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    greater_is_better: ClassVar[bool] = True

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_model)

    def matches(self, config: dict) -> bool:
        return any(a.endswith(self.architecture_suffixes) for a in config.get("architectures") or [])

    @abstractmethod
    def load_processor(self, path, trust_remote_code: bool = False) -> Any:
        """The tokenizer or image processor shipped with the experts."""

    @abstractmethod
    def resolve_columns(self, column_names: Sequence[str], data: DataConfig) -> dict[str, str]:
        """Role → column name (given or detected); a missing column is an error listing those that exist."""

    @abstractmethod
    def preprocess(self, dataset, processor, columns: dict[str, str], data: DataConfig, model_config: dict):
        """A dataset whose rows are model inputs (plus ``labels``)."""

    @abstractmethod
    def collator(self, processor) -> Callable:
        """Batches preprocessed rows into tensors."""

    @abstractmethod
    def batch_stats(self, outputs, batch: dict) -> dict[str, torch.Tensor]:
        """Sums for one batch: at least ``loss_sum`` (differentiable) and ``count``."""

    @abstractmethod
    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from summed stats: ``loss`` plus the task's metrics."""

    def compute_metrics(self, model_config: dict) -> Optional[Callable]:
        """A `transformers.Trainer` ``compute_metrics`` function for this task, or None."""
        return None

    def head_module(self, model) -> Optional[torch.nn.Module]:
        """The classification head whose input are the penultimate features (for LogME); None if none."""
        for name in ("classifier", "score"):
            module = getattr(model, name, None)
            if isinstance(module, torch.nn.Module):
                return module
        return None

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k != "labels"}


def load_tokenizer(path, trust_remote_code: bool = False):
    """The experts' tokenizer; one without a pad token pads with its end-of-sequence token (as GPT-2 needs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the registry under its lowercase, unique ``name``."""
    name = cls.name
    if name != name.lower():
        raise ValueError(f"Task names are lowercase; got {name!r}.")
    if name in _TASKS:
        raise KeyError(f"There is already a task called {name!r}; choose a unique name.")
    _TASKS[name] = cls()
    return cls


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise GlueError(f"unknown task {name!r}; choose one of: {', '.join(sorted(_TASKS))}.") from None


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def detect_task(config: dict, name: Optional[str] = None) -> Task:
    """The task named by the user, else the one whose architecture suffix matches the experts' config."""
    if name:
        return get_task(name)
    for task in _TASKS.values():
        if task.matches(config):
            return task
    raise GlueError(
        f"cannot tell the task from the experts' architectures {config.get('architectures')}: "
        f"pass --task ({', '.join(sorted(_TASKS))})."
    )


def pick_column(
    role: str, given: Optional[str], candidates: Sequence[str], column_names: Sequence[str], flag: str
) -> str:
    """The column for ``role``: the one named with ``flag`` if it exists, else the first common name found."""
    if given:
        if given not in column_names:
            raise GlueError(
                f"dataset has no column {given!r} (given with {flag}); its columns are: {', '.join(column_names)}."
            )
        return given
    for name in candidates:
        if name in column_names:
            return name
    raise GlueError(
        f"dataset has no {role} column (looked for {', '.join(candidates)}); its columns are: "
        f"{', '.join(column_names)}. Name it with {flag}."
    )
