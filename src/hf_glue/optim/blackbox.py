"""Black-box coefficient search (CMA-ES, NGOpt) on GLUE's objective, parametrisation and forward-pass budget.

One ask/tell loop (`run_search`) drives every optimiser through the small `AskTell` interface:

- **Coordinates.** The optimiser searches x of shape ``[G, K]`` in the parametrisation's coordinates: α itself on
  the simplex (a candidate is scored, and the answer reported, projected onto the simplex), logits with softmax,
  coefficients clipped to --bounds in the box (task vectors).
  It starts at ``initial_alpha`` (uniform or ∝ --data-sizes).
- **Evaluations.** A generation's candidates are all scored on one train minibatch (common random numbers), one
  forward pass each, at most 2·q models per blend (q = --spsa-samples: the memory a GLUE step holds). Losses are
  of the global batch (data-parallel processes sum their shards; perturbation-parallel ones all score every
  candidate on the shared batch), so every process asks and tells the same and ends at the same α.
- **Budget.** Exactly GLUE's forward passes on train batches with the same config (`glue_budget`: its steps and
  its gain calibration), so `hf-glue compare` sets them side by side at equal cost; both then score their
  candidates on the same validation rows. It is split into ⌈budget / λ⌉ generations of λ or λ − 1
  candidates, λ ≤ 4 + ⌊3 ln(G·K)⌋ (the CMA-ES default population).
  With --parallel perturbation on P processes the count is one process's (as GLUE's is), but GLUE's processes
  score P·2q distinct models a step while every process here scores the same candidates: compare the methods
  at equal cost in data-parallel mode.
- **Step size.** The initial standard deviation per coordinate (`initial_step`) follows pycma's guidance that the
  optimum lie within x0 ± 3σ0: 0.3 on α (each α lies in [0, 1]), 1.0 on logits (±3 spans α from even to one
  expert holding nearly all); --first-step sets it instead.
- **Seed.** Each optimiser draws from its own generator seeded with --seed (numpy's global one is left alone), and
  the data order comes from --seed as for GLUE: same seed, same α.
- **Answer.** The optimiser's recommendation (CMA-ES: the mean of its search distribution; NGOpt: its
  recommendation), mapped to α; ``history`` holds one entry per generation. With validation rows, the final and
  intermediate recommendations are proposals, chosen from beside the simple starts exactly as GLUE's iterates are
  (`methods.selection`).

The packages are imported only when a search runs; a missing one is a `GlueError` naming the extra to install.
"""

from __future__ import annotations

import importlib
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np
import torch

from ..config import GlueConfig
from ..errors import GlueError
from ..io.progress import progress
from .spsa import make_parametrization

if TYPE_CHECKING:
    from ..methods.base import MergeContext, MethodOutput


def glue_budget(config: GlueConfig) -> int:
    """GLUE's forward passes on train batches with ``config``: the budget every black-box search gets."""
    from ..methods.glue import Glue

    return Glue.forward_passes(config)


def default_population(dimension: int) -> int:
    """The CMA-ES default population 4 + ⌊3 ln n⌋ for n searched coordinates (used for NGOpt's batches too)."""
    return 4 + int(3 * math.log(dimension))


def generation_sizes(budget: int, population: int) -> list[int]:
    """``budget`` evaluations in ⌈budget / population⌉ generations whose sizes differ by at most one, largest first."""
    generations = -(-budget // population)
    return [budget // generations + (1 if i < budget % generations else 0) for i in range(generations)]


def initial_step(config: GlueConfig) -> float:
    """σ0 of the search: --first-step when given, else 0.3 on α (simplex, box) or 1.0 on logits (softmax)."""
    if config.first_step is not None:
        return config.first_step
    return 1.0 if config.space == "softmax" else 0.3


def models_per_call(config: GlueConfig) -> int:
    """How many blends are held at once: 2·q, as one GLUE step holds (the memory check counts the same)."""
    return 2 * config.spsa_samples


@dataclass(frozen=True)
class SearchSetup:
    """What an optimiser is built from: start (flattened x), initial step, largest generation, budget, seed."""

    x0: np.ndarray
    sigma0: float
    population: int
    budget: int
    seed: int


class AskTell(ABC):
    """An optimiser behind ask/tell, built from a `SearchSetup`: ``ask(n)`` candidates, ``tell`` their losses."""

    #: the package imported, and the hf-glue extra that installs it
    module: ClassVar[str]
    extra: ClassVar[str]
    #: the smallest generation the optimiser accepts
    min_generation: ClassVar[int] = 1

    @classmethod
    def require(cls) -> ModuleType:
        """The optimiser's package, or a `GlueError` saying which extra installs it (checked before any work)."""
        try:
            return importlib.import_module(cls.module)
        except ImportError:
            raise GlueError(f"the {cls.module} package is not installed and this method needs it: "
                            f"pip install \"hf-glue[{cls.extra}]\".") from None

    @property
    @abstractmethod
    def name(self) -> str:
        """The algorithm that runs (recorded in the result's details)."""

    @abstractmethod
    def ask(self, n: int) -> np.ndarray:
        """``n`` candidates, ``[n, D]``; they stay pending until `tell`."""

    @abstractmethod
    def tell(self, losses: Sequence[float]) -> None:
        """The losses of the pending candidates, in the order asked."""

    @abstractmethod
    def recommendation(self) -> np.ndarray:
        """The current answer, ``[D]``."""


class CMAES(AskTell):
    """`cma.CMAEvolutionStrategy` (pycma, as in mergekit-evolve), quiet, writing no files."""

    module, extra = "cma", "cma"
    min_generation = 3  # pycma refuses to update from fewer than three solutions

    def __init__(self, setup: SearchSetup) -> None:
        cma = self.require()
        rng = np.random.default_rng(setup.seed)

        def randn(rows: int, columns: int) -> np.ndarray:
            return rng.standard_normal((rows, columns))

        self.es = cma.CMAEvolutionStrategy(setup.x0, setup.sigma0, {
            "popsize": setup.population,
            "seed": float("nan"),  # nan: pycma does not (re)seed numpy's global generator; ``randn`` is ours
            "randn": randn,
            "CMA_mirrors": 0,  # every candidate an independent draw (generations may be one short of popsize)
            "verbose": -9, "verb_disp": 0, "verb_log": 0,
        })
        self.pending: list[np.ndarray] = []

    @property
    def name(self) -> str:
        return "CMA-ES"

    def ask(self, n: int) -> np.ndarray:
        self.pending = self.es.ask(n)
        return np.asarray(self.pending)

    def tell(self, losses: Sequence[float]) -> None:
        # the budget, not pycma's stopping rules, ends the search: tell/ask go on whatever es.stop() says
        self.es.tell(self.pending, list(losses))

    def recommendation(self) -> np.ndarray:
        return np.array(self.es.mean, dtype=np.float64)


class NGOpt(AskTell):
    """nevergrad's `NGOpt` wizard (LoraHub's optimiser), told the loss is noisy, batches of ``population``.

    A minibatch loss is noisy, and saying so steers NGOpt to its noise-handling algorithms; its path for
    deterministic functions (MetaModel) also fails with NumPy ≥ 2.4 in nevergrad 1.0.12 and leaves a thread
    that keeps the process alive.
    """

    module, extra = "nevergrad", "nevergrad"

    def __init__(self, setup: SearchSetup) -> None:
        ng = self.require()
        space = ng.p.Array(init=setup.x0).set_mutation(sigma=setup.sigma0)
        space.random_state = np.random.RandomState(setup.seed)
        space.function.deterministic = False
        self.opt = ng.optimizers.NGOpt(parametrization=space, budget=setup.budget,
                                       num_workers=setup.population)
        self.pending: list = []
        self._warning = ng.errors.LossTooLargeWarning

    @property
    def name(self) -> str:
        return f"NGOpt: {self.opt.optim.name}"  # the algorithm the wizard selected

    def ask(self, n: int) -> np.ndarray:
        self.pending = [self.opt.ask() for _ in range(n)]
        return np.stack([c.value for c in self.pending])

    def tell(self, losses: Sequence[float]) -> None:
        with warnings.catch_warnings():
            # a portfolio tells its members huge stand-in losses for candidates they did not propose
            warnings.simplefilter("ignore", self._warning)
            for candidate, loss in zip(self.pending, losses):
                self.opt.tell(candidate, float(loss))

    def recommendation(self) -> np.ndarray:
        return np.array(self.opt.recommend().value, dtype=np.float64)


def run_search(ctx: MergeContext, optimizer: type[AskTell], label: str) -> MethodOutput:
    """Learn α with ``optimizer`` as the module docstring says; ``label`` names the progress bar and errors."""
    from ..methods.base import MethodOutput, initial_alpha  # here: the methods package imports this module
    from ..methods.selection import snapshot_steps

    optimizer.require()  # a missing package fails before any batch is drawn
    cfg, matrix = ctx.config, ctx.matrix
    param = make_parametrization(cfg.space, cfg.bounds)
    x0 = param.init(initial_alpha(cfg, matrix.num_groups, matrix.num_experts))
    budget = glue_budget(cfg)
    population = min(default_population(x0.numel()), budget)
    if budget < optimizer.min_generation:
        raise GlueError(f"{label} needs at least {optimizer.min_generation} forward passes; GLUE's budget with these "
                        f"options is {budget}: raise --steps.")
    sizes = generation_sizes(budget, population)
    setup = SearchSetup(x0=x0.reshape(-1).numpy(), sigma0=initial_step(cfg), population=sizes[0], budget=budget,
                        seed=cfg.seed)
    opt = optimizer(setup)

    def to_alpha(x: np.ndarray) -> torch.Tensor:  # [n, D] coordinates → [n, G, K] coefficients
        return param.alpha(param.project(torch.from_numpy(x).reshape(-1, *x0.shape)))

    chunk = models_per_call(cfg)
    snapshots = snapshot_steps(len(sizes))
    proposals: dict[str, torch.Tensor] = {}
    history: list[dict] = []
    bar = progress(sizes, label, disable=not ctx.is_main_process)
    for step, n in enumerate(bar):
        alphas = to_alpha(opt.ask(n))
        batch = next(ctx.batches)
        losses = torch.cat([ctx.objective.losses(alphas[i:i + chunk], batch).double()
                            for i in range(0, n, chunk)])
        finite = torch.isfinite(losses)
        if not bool(finite.any()):
            raise GlueError(f"{label}: the target loss was not finite for any of the {n} candidates of generation "
                            f"{step}: check the experts and the target data, or try --dtype float32 or a smaller "
                            "--first-step.")
        # a non-finite candidate ranks below every finite one of its generation
        opt.tell(torch.where(finite, losses, losses[finite].max() + 1).tolist())
        alpha = to_alpha(opt.recommendation()[None])[0]
        if step + 1 in snapshots:
            proposals[f"search: recommendation after generation {step + 1}"] = alpha.clone()
        coefficients = matrix.summarize(alpha)
        loss = float(losses[finite].mean())
        history.append({"step": step, "loss": loss, "coefficients": coefficients,
                        **({"non_finite": int((~finite).sum())} if not bool(finite.all()) else {})})
        ctx.log_step(history[-1])
        bar.set_postfix_str(f"loss={loss:.4f} α=[{' '.join(f'{v:.2f}' for v in coefficients.values())}]")
    details = {"optimizer": opt.name, "generations": len(sizes), "population": sizes[0],
               "initial_step": setup.sigma0, "budget": budget}
    proposals[f"search: final recommendation (generation {len(sizes)})"] = alpha.clone()
    return MethodOutput(alpha=alpha.clone(), history=history, details=details, proposals=proposals)
