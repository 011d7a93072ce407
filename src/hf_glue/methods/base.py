"""The merge-method interface: every method learns or picks α and returns the same `MethodOutput`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional

import torch

from ..engine.matrix import ExpertMatrix
from ..config import GlueConfig
from ..engine.memory import peak_memory_bytes, reset_peak_memory
from ..errors import GlueError
from ..io.checkpoint import Checkpoint
from .objective import Objective
from .selection import Selection

_METHODS: dict[str, "MergeMethod"] = {}


@dataclass
class MergeContext:
    """What a method may use: the experts' matrix, the target objective, endless train batches."""

    matrix: ExpertMatrix
    objective: Objective
    batches: Iterator[dict]
    config: GlueConfig
    accelerator: Any = None
    #: where an iterative method saves its state for --resume (None: no saving, e.g. in compare)
    checkpoint: Optional[Checkpoint] = None
    #: the experiment trackers each step is logged to (--report-to); None: none
    tracker: Any = None
    #: scores the candidates on the validation rows and chooses the answer (None: the method's own answer stands)
    selection: Optional[Selection] = None

    def log_step(self, entry: dict) -> None:
        """Hand one history entry (loss, gains, α) to the experiment trackers, if any."""
        if self.tracker is not None:
            self.tracker.log_step(entry)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process


@dataclass
class MethodOutput:
    """α (``[G, K]``) and what it cost; ``history`` holds one dict per optimisation step."""

    alpha: torch.Tensor
    history: list[dict] = field(default_factory=list)
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0
    peak_memory_bytes: Optional[int] = None
    details: dict = field(default_factory=dict)
    #: passes and seconds spent before a resume (a resumed run reports the whole search's cost)
    prior_forward_passes: int = 0
    prior_seconds: float = 0.0
    #: what a searching method proposes as its answer (name → α), chosen from on the validation rows
    proposals: dict[str, torch.Tensor] = field(default_factory=dict)


class MergeMethod(ABC):
    """A named way of choosing α; registered with ``@register_method``."""

    name: ClassVar[str]
    pretty_name: ClassVar[str]
    description: ClassVar[str]
    reference_url: ClassVar[Optional[str]] = None
    #: optional packages the method runs on (their versions are recorded in the result)
    packages: ClassVar[tuple[str, ...]] = ()
    #: whether α depends on --seed (data order, perturbations): compare then runs the method once per seed
    seeded: ClassVar[bool] = False
    #: whether the method searches: its batches exclude the validation rows, and its answer is chosen on them
    #: among its proposals and the simple starts (`selection.Selection`)
    selects: ClassVar[bool] = False

    def check_available(self) -> None:
        """Raise a `GlueError` naming what to install when an optional package the method needs is missing
        (called before any expert is loaded)."""

    def models_per_step(self, config: GlueConfig) -> int:
        """Blends held at once while searching (the memory check counts their product buffers)."""
        return 1

    @abstractmethod
    def _run(self, ctx: MergeContext) -> MethodOutput:
        """Choose α; fill history and backward passes (forward passes and time are measured by `run`)."""

    def run(self, ctx: MergeContext) -> MethodOutput:
        device = ctx.matrix.device
        reset_peak_memory(device)
        passes, start = ctx.objective.forward_passes, time.perf_counter()
        out = self._run(ctx)
        if ctx.selection is not None:
            chosen = ctx.selection.choose(out.proposals or {"search: answer": out.alpha})
            out.alpha = chosen.alpha.clone()
            out.details["selection"] = ctx.selection.record(chosen)
        out.seconds = time.perf_counter() - start + out.prior_seconds
        out.forward_passes = ctx.objective.forward_passes - passes + out.prior_forward_passes
        out.peak_memory_bytes = peak_memory_bytes(device)
        return out


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add a method under its lowercase, unique ``name``."""
    name = cls.name
    if name != name.lower():
        raise ValueError(f"Merge method names are lowercase; got {name!r}.")
    if name in _METHODS:
        raise KeyError(f"There is already a merge method called {name!r}; choose a unique name.")
    _METHODS[name] = cls()
    return cls


def method_info(name: str) -> dict:
    """A method's display name, description and reference, recorded in the result (the card shows them)."""
    method = get_method(name)
    return {"pretty_name": method.pretty_name, "description": method.description, "reference": method.reference_url}


def check_method(name: str) -> MergeMethod:
    """The registered method ``name``, refused early when unknown or when an optional package it needs is missing."""
    method = get_method(name)
    method.check_available()
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise GlueError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}.") from None


def available_methods() -> list[str]:
    return list(_METHODS)


def initial_alpha(config: GlueConfig, groups: int, experts: int) -> torch.Tensor:
    """Uniform α, or α ∝ --data-sizes, repeated for every group: ``[G, K]`` float64."""
    if config.init == "data-size":
        sizes = torch.tensor(check_data_sizes(config, experts), dtype=torch.float64)
        alpha = sizes / sizes.sum()
    else:
        alpha = torch.full((experts,), 1.0 / experts, dtype=torch.float64)
    return alpha.repeat(groups, 1)


def check_data_sizes(config: GlueConfig, experts: int) -> list[int]:
    if not config.data_sizes:
        raise GlueError("this needs the experts' training-set sizes: pass --data-sizes n1 n2 ... (one per expert).")
    if len(config.data_sizes) != experts:
        raise GlueError(
            f"--data-sizes has {len(config.data_sizes)} values but there are {experts} experts; give one per expert."
        )
    return list(config.data_sizes)
