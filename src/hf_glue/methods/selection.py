"""The search's answer, chosen on validation rows held apart from the search: never worse there than a simple start.

Every candidate is scored on the same validation rows (kept out of the target's *training* split before the search
draws a batch; the eval split is never touched): the simple starts a user would take instead (uniform, data-size
when --data-sizes are known, every expert alone, the even blends of pairs of the best experts) and what the method
proposes (GLUE: its last, averaged and intermediate iterates; cma/nevergrad: their recommendations). The lowest
validation loss wins, so the answer is never worse on those rows than uniform, data-size or any expert alone.
GLUE also starts from the best simple start (the screening), so those scores are computed once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from ..config import GlueConfig
from ..optim.spsa import make_parametrization, midpoints, vertices

#: the search's candidates are taken at these fractions of its steps (with the last and the averaged iterate)
SNAPSHOT_FRACTIONS = (0.2, 0.4, 0.6, 0.8)


#: the even blends of every pair of this many best experts alone are simple starts (all pairs up to 4 experts)
PAIRED = 4


def snapshot_steps(steps: int) -> set[int]:
    """The steps (1-based counts of updates done) after which a search records its iterate as a candidate."""
    return {s for s in (math.ceil(f * steps) for f in SNAPSHOT_FRACTIONS) if 0 < s < steps}


@dataclass
class Candidate:
    """One coefficient set and its validation loss; ``kind`` is ``start`` (a simple start) or ``search``."""

    name: str
    alpha: torch.Tensor
    loss: float
    kind: str


class Selection:
    """Scores coefficient sets on the validation rows and keeps every score (the record `record` writes)."""

    def __init__(self, objective, batches: Callable[[], Iterable[dict]], config: GlueConfig, layout,
                 rows: int, split_seed: int, held_apart: bool = True) -> None:
        """``batches``: a fresh iterable of the validation batches per call; ``layout``: the engine's coefficient
        layout (experts, groups); ``rows``, ``split_seed`` and ``held_apart``: how many validation rows there are,
        the seed that drew them and whether the search never sees them (recorded)."""
        self.objective, self.batches, self.config, self.layout = objective, batches, config, layout
        self.rows, self.split_seed, self.held_apart = rows, split_seed, held_apart
        #: the search's feasible set: a simple start outside --bounds (box) is scored where the search could be
        self.project = make_parametrization(config.space, config.bounds).project
        self.scored: list[Candidate] = []
        self.forward_passes = 0
        self.seconds = 0.0
        self._starts: Optional[list[Candidate]] = None

    def score(self, name: str, alpha: torch.Tensor, kind: str) -> Candidate:
        """The validation loss of θ(α) (non-finite: +inf, never chosen); recorded once per distinct α."""
        alpha = alpha.detach().double().cpu().reshape(self.layout.num_groups, self.layout.num_experts)
        for done in self.scored:
            if torch.equal(done.alpha, alpha):  # scored already: a repeated start is skipped, a search's recorded
                return done if kind == "start" or done.name == name else self._add(name, alpha, done.loss, kind)
        passes, start = self.objective.forward_passes, time.perf_counter()
        loss = float(self.objective.evaluate(alpha, self.batches()).get("loss", math.inf))
        self.forward_passes += self.objective.forward_passes - passes
        self.seconds += time.perf_counter() - start
        return self._add(name, alpha, loss if math.isfinite(loss) else math.inf, kind)

    def _add(self, name: str, alpha: torch.Tensor, loss: float, kind: str) -> Candidate:
        candidate = Candidate(name, alpha, loss, kind)
        self.scored.append(candidate)
        return candidate

    def starts(self) -> list[Candidate]:
        """The simple starts, scored (once): uniform, data-size (with --data-sizes), every expert alone, then the
        even blend of each pair of the `PAIRED` best experts alone."""
        if self._starts is None:
            from .base import initial_alpha  # base imports this module

            groups, experts = self.layout.num_groups, self.layout.num_experts
            uniform = initial_alpha(GlueConfig(init="uniform"), groups, experts)
            first = [self.score("uniform", self.project(uniform), "start")]
            if self.config.data_sizes:
                sizes = GlueConfig(init="data-size", data_sizes=list(self.config.data_sizes))
                first.append(self.score("data-size", self.project(initial_alpha(sizes, groups, experts)), "start"))
            names = self.layout.expert_names
            # task vectors (--combine): a one-hot λ is the base plus that expert's processed task vector
            what = "task vector" if getattr(self.layout, "offset", False) else "expert"
            alone = [self.score(f"{what}: {names[k]}", self.project(v), "start")
                     for k, v in enumerate(vertices(groups, experts))]
            # two experts that fail alone may blend best (a target spanning both domains): every pair of the best
            # PAIRED experts alone
            best = sorted(alone, key=lambda c: c.loss)[:PAIRED]
            blends = midpoints(torch.stack([c.alpha for c in best]))
            pairs = [(a.name.split(": ", 1)[1], b.name.split(": ", 1)[1]) for i, a in enumerate(best)
                     for b in best[i + 1:]]
            mids = [self.score(f"even blend: {a} + {b}", self.project(blend), "start")
                    for (a, b), blend in zip(pairs, blends)]
            self._starts = first + alone + mids
        return self._starts

    def best_start(self) -> Candidate:
        """The simple start with the lowest validation loss (the first of equals: uniform wins ties)."""
        return min(self.starts(), key=lambda c: c.loss)

    def choose(self, proposals: dict[str, torch.Tensor]) -> Candidate:
        """Score the method's ``proposals`` beside the simple starts; the lowest validation loss (the first of
        equals, so a simple start wins a tie with the search)."""
        self.starts()
        for name, alpha in proposals.items():
            self.score(name, alpha, "search")
        return min(self.scored, key=lambda c: c.loss)

    def state_dict(self) -> dict:
        """The scores so far, for a resumed search to reuse (--resume)."""
        return {"forward_passes": self.forward_passes, "seconds": self.seconds,
                "scored": [{"name": c.name, "alpha": c.alpha.tolist(), "kind": c.kind,
                            "loss": c.loss if math.isfinite(c.loss) else None} for c in self.scored]}

    def load_state_dict(self, state: dict) -> None:
        self.forward_passes, self.seconds = int(state["forward_passes"]), float(state["seconds"])
        self.scored = [Candidate(c["name"], torch.tensor(c["alpha"], dtype=torch.float64),
                                 math.inf if c["loss"] is None else float(c["loss"]), c["kind"])
                       for c in state["scored"]]
        starts = [c for c in self.scored if c.kind == "start"]  # scored all at once, or not yet
        self._starts = starts or None

    def record(self, chosen: Candidate) -> dict:
        """What merge_result.json and the card show: the validation rows and every candidate's loss."""
        return {
            "validation_rows": self.rows,
            "held_apart": self.held_apart,
            "validation_fraction": self.config.validation_fraction,
            "split_seed": self.split_seed,
            "chosen": chosen.name,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "candidates": [{"name": c.name, "kind": c.kind, "loss": c.loss if math.isfinite(c.loss) else None,
                            "coefficients": self.layout.summarize(c.alpha)} for c in self.scored],
        }
