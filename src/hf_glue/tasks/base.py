"""The task interface: how a task family maps dataset columns to model inputs and scores a batch.

Scores are returned as sums (loss_sum, count, ...) so they reduce exactly across processes.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from ..config import DataConfig
from ..errors import GlueError

logger = logging.getLogger(__name__)

_TASKS: dict[str, "Task"] = {}
#: Model types whose position ids start after the padding index: two fewer usable positions than embeddings.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                     "roberta-prelayernorm", "ibert", "mpnet")


def wide_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum in float64 (float32 on Apple's MPS, which has none): the same total whichever way processes split a
    batch, so 1 and N processes see the same loss."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64).sum()


class Task(ABC):
    """One task family: sequence classification, causal LM, image classification, ..."""

    name: ClassVar[str]
    pretty_name: ClassVar[str]
    auto_model: ClassVar[str]  # the transformers Auto class name
    pipeline_tag: ClassVar[str]
    architecture_suffixes: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    greater_is_better: ClassVar[bool] = True
    #: whether the Trainer's evaluation equals the search's (`batch_stats` sums); if not, fine-tuning reports the
    #: latter before and after, so the card compares like with like
    trainer_metrics_exact: ClassVar[bool] = True

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_model)

    def matches(self, config: dict) -> bool:
        return any(a.endswith(self.architecture_suffixes) for a in config.get("architectures") or [])

    def supports(self, config: dict) -> bool:
        """Whether this task's Auto class builds the experts' ``model_type`` (or their own code's, via
        ``auto_map``), read from transformers' name table without importing any model."""
        known = self.model_class()._model_mapping._model_mapping  # model_type → class name
        return config.get("model_type") in known or self.auto_model in (config.get("auto_map") or {})

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

    def compute_metrics(self, model_config: dict, processor: Any) -> Optional[Callable]:
        """A `transformers.Trainer` ``compute_metrics`` function for this task, or None (``processor``: for tasks
        whose scoring decodes token ids to words)."""
        return None

    def trainer_collator(self, processor) -> Callable:
        """The collator `transformers.Trainer` gets: ``collator``'s, unless that adds keys for ``batch_stats`` that
        the model does not take (the Trainer passes every key to the model)."""
        return self.collator(processor)

    def preprocess_logits_for_metrics(self) -> Optional[Callable]:
        """A `transformers.Trainer` ``preprocess_logits_for_metrics`` (what is kept of each eval batch's logits for
        `compute_metrics`), or None: the logits as they are."""
        return None

    def generation_metrics(self, model, dataset, processor, batch_size: int, max_new_tokens: int
                           ) -> Optional[dict[str, float]]:
        """Metrics of ``model``'s generated outputs on ``dataset`` (preprocessed held-out rows), for tasks scored by
        what the model generates (seq2seq); None for the others. ``model`` is a whole `PreTrainedModel`; this runs
        on one process."""
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


def load_tokenizer(path, trust_remote_code: bool = False, **kwargs):
    """The experts' tokenizer; one without a pad token pads with its end-of-sequence token (as GPT-2 needs).
    ``kwargs``: for `AutoTokenizer.from_pretrained` (``add_prefix_space``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
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


def detect_task(config: dict, name: Optional[str] = None, heads_from_config: bool = True) -> Task:
    """The task named by the user, else the one whose architecture suffix matches the experts' config; refuses,
    before any weights or tokenizer are loaded, an architecture the task's Auto class cannot build, and (when the
    weights come with the config: ``heads_from_config``) a named task that would replace the experts' own head."""
    architecture = ", ".join(config.get("architectures") or []) or "a model without `architectures`"
    found = f"{architecture} (model_type {config.get('model_type')!r})"
    if name:
        task = get_task(name)
        if not task.supports(config):
            raise GlueError(f"--task {name}: the experts are {found}, which {task.auto_model} cannot build.")
        own = next((t for t in _TASKS.values() if t.matches(config) and t.supports(config)), None)
        if heads_from_config and own is not None and own is not task and not task.matches(config):
            raise GlueError(f"--task {name}: the experts are {found}, with a {own.name} head; {task.auto_model} "
                            f"would replace it with a new, untrained one. Drop --task (or use --task {own.name}).")
        return task
    for task in _TASKS.values():
        if task.matches(config) and task.supports(config):
            return task
    if any(task.matches(config) for task in _TASKS.values()):
        raise GlueError(f"the experts are {found}, which no hf-glue task supports; supported: "
                        f"{', '.join(f'{t.name} ({t.auto_model})' for t in _TASKS.values())}.")
    raise GlueError(f"cannot tell the task from the experts' config ({found}): pass --task "
                    f"({', '.join(sorted(_TASKS))}).")


def position_limit(model_config: dict) -> Optional[int]:
    """How many tokens the experts' position embeddings hold (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions"):
        limit = model_config.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if model_config.get("model_type") in _OFFSET_POSITIONS:
                limit -= int(model_config.get("pad_token_id") or 0) + 1
            return limit
    return None


DEFAULT_MAX_LENGTH = 128


def fit_max_length(data: DataConfig, model_config: dict) -> DataConfig:
    """``data`` with ``max_length`` set: the given value or 128, cut to the experts' positions (longer inputs
    would index past them); a given value that is cut is noted."""
    limit = position_limit(model_config)
    wanted = data.max_length or DEFAULT_MAX_LENGTH
    if limit is not None and wanted > limit:
        if data.max_length is not None:
            logger.warning("note: --max-length %d is more than the experts' %d positions; text is truncated to %d "
                           "tokens.", wanted, limit, limit)
        wanted = limit
    return dataclasses.replace(data, max_length=wanted)


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
