"""Two-point SPSA on the probability simplex: a pure optimiser that only sees a loss callable.

At step t: Δ_t ~ Rademacher (seeded by (seed, t), identical on every process), c_t = c / (t+1)^γ,
a_t = a / (t+1+A)^0.602, L± = loss(θ(α(x ± c_t Δ_t))) on the same batch, ĝ = (L+ − L−)/(2c_t) · Δ_t,
x ← x − a_t ĝ. ``simplex`` works on α itself (Δ centred so α ± cΔ keeps Σα = 1, projection after each
update); ``softmax`` works on logits w with α = softmax(w).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

#: A loss callable: coefficient sets ``[M, G, K]`` → losses ``[M]`` (all on the same minibatch).
LossFn = Callable[[torch.Tensor], torch.Tensor]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (Duchi et al., 2008).

    Rows are first shifted so that their largest entry is 0 (the projection is unchanged by adding a constant to a
    row): coordinates of 1e16, which an unbounded optimiser (NGOpt) can propose, otherwise cancel in the running
    sums and give rows that sum to 0 or 2."""
    v = v - v.max(dim=-1, keepdim=True).values
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / ind) > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(v - theta, min=0)


class Parametrization:
    """Maps optimiser coordinates x to coefficients α, and shapes perturbation directions."""

    name = ""

    def init(self, alpha0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def tangent(self, grad: torch.Tensor) -> torch.Tensor:
        """The part of a gradient in x that moves along the feasible set (for gradient-based optimisers)."""
        return grad

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SimplexParametrization(Parametrization):
    """x = α; directions centred per group (Σα stays 1); projection onto the simplex after each update."""

    name = "simplex"

    def init(self, alpha0):
        return alpha0.clone()

    def alpha(self, x):
        return x

    def direction(self, delta):
        return delta - delta.mean(-1, keepdim=True)

    def tangent(self, grad):
        return grad - grad.mean(-1, keepdim=True)

    def project(self, x):
        return project_simplex(x)


class SoftmaxParametrization(Parametrization):
    """x = logits w, α = softmax(w) per group."""

    name = "softmax"

    def init(self, alpha0):
        return torch.log(alpha0.clamp_min(1e-8))

    def alpha(self, x):
        return torch.softmax(x, dim=-1)


class BoxParametrization(Parametrization):
    """x = α, every coefficient clipped to [lo, hi] after each update (task vectors: θ_base + Σ λ_k τ_k)."""

    name = "box"

    def __init__(self, lo: float = 0.0, hi: float = 1.5) -> None:
        self.lo, self.hi = lo, hi

    def init(self, alpha0):
        return self.project(alpha0.clone())

    def alpha(self, x):
        return x

    def project(self, x):
        return x.clamp(self.lo, self.hi)


#: the parametrizations by name; box is built over the run's --bounds
PARAMETRIZATIONS: dict[str, type[Parametrization]] = {
    p.name: p for p in (SimplexParametrization, SoftmaxParametrization, BoxParametrization)}


def make_parametrization(name: str, bounds: Sequence[float] = (0.0, 1.5)) -> Parametrization:
    """The parametrization called ``name``; ``bounds`` are box's [lo, hi]."""
    return PARAMETRIZATIONS[name](*bounds) if name == BoxParametrization.name else PARAMETRIZATIONS[name]()


def vertices(groups: int, experts: int) -> torch.Tensor:
    """Every expert alone, as coefficient sets ``[K, G, K]`` (the same expert in every group)."""
    return torch.eye(experts, dtype=torch.float64).unsqueeze(1).repeat(1, groups, 1)


def midpoints(points: torch.Tensor) -> torch.Tensor:
    """The even blend of every pair of ``points`` ``[M, G, K]``: ``[M(M−1)/2, G, K]``."""
    pairs = [(points[i] + points[j]) / 2 for i in range(len(points)) for j in range(i + 1, len(points))]
    return torch.stack(pairs) if pairs else points[:0]


#: Gathers every process's local losses ``[2q]`` into ``[P, 2q]`` in rank order (perturbation-parallel runs).
LossGather = Optional[Callable[[torch.Tensor], torch.Tensor]]


class NonFiniteLoss(RuntimeError):
    """The search met non-finite losses it could not recover from; the message names the step."""


@dataclass
class StepRecord:
    """What one SPSA step measured: mean L± over its samples and the coefficients after the update.

    ``rejected`` steps met a non-finite loss: α was left as it was and the gain halved.
    """

    step: int
    loss_plus: float
    loss_minus: float
    alpha: torch.Tensor
    rejected: bool = False
    #: the step's gain a_t and perturbation size c_t
    gain: float = 0.0
    perturbation: float = 0.0


class SPSA:
    """Two-point SPSA with Spall's gain sequences; ``a`` may be calibrated from probe measurements.

    On the simplex, Δ is centred per group and rows that centre to zero are drawn again, so a row is uniform over
    the 2^K − 2 non-constant sign patterns and E[d dᵀ] = s_K (I − 11ᵀ/K) with s_K = 2^(K−1) / (2^(K−1) − 1): ĝ
    estimates s_K times the gradient's component in the simplex's plane (calibration absorbs s_K; a given
    ``--gain`` is scaled by it).

    Sample ``i`` of step ``t`` uses Δ(seed, t, i), a pure function, so every process can rebuild any other's
    perturbation: in perturbation-parallel runs process ``p`` evaluates samples ``p·q … p·q + q − 1`` and the
    gathered losses give every process the same average of all ``P·q`` estimates — exactly what one process
    with ``P·q`` samples would compute.
    """

    #: Consecutive non-finite steps after which the search stops.
    MAX_REJECTIONS = 5

    def __init__(
        self,
        alpha0: torch.Tensor,
        parametrization: str | Parametrization = "simplex",
        *,
        c: float = 0.05,
        gamma: float = 0.101,
        a: Optional[float] = None,
        A: float = 10.0,
        seed: int = 0,
        samples: int = 1,
        sample_offset: int = 0,
        max_move: Optional[float] = None,
        average_from: Optional[int] = None,
    ) -> None:
        self.param = parametrization if isinstance(parametrization, Parametrization) else \
            make_parametrization(parametrization)
        self.x = self.param.init(alpha0.double())
        self.c, self.gamma, self.a, self.A = c, gamma, a, A
        self.seed, self.samples, self.sample_offset = seed, samples, sample_offset
        self.max_move = max_move
        #: iterates after the updates of steps ``average_from`` … are averaged (Polyak–Ruppert); None: none are
        self.average_from = average_from
        self.alpha_sum: Optional[torch.Tensor] = None
        self.averaged_steps = 0
        self.t = 0
        self.rejections = 0
        #: halved by every rejected step: the next evaluations stay closer to the last good α
        self.shrink = 1.0

    @property
    def alpha(self) -> torch.Tensor:
        return self.param.alpha(self.x)

    @property
    def result(self) -> torch.Tensor:
        """The search's answer: the average of the averaged iterates' α, or the current α when none is averaged yet."""
        return self.alpha if self.alpha_sum is None else self.alpha_sum / self.averaged_steps

    def restart(self, alpha: torch.Tensor) -> None:
        """Move the start to ``alpha`` (e.g. the best of screened candidates), before any step."""
        self.x = self.param.init(alpha.double())

    def c_t(self, t: int) -> float:
        return self.c * self.shrink / (t + 1) ** self.gamma

    def a_t(self, t: int) -> float:
        if self.a is None:
            raise RuntimeError("SPSA gain a is not set: pass a= or call calibrate() first.")
        return self.a / (t + 1 + self.A) ** 0.602

    def perturbation(self, t: int, i: int = 0) -> torch.Tensor:
        """Rademacher Δ (as a direction) for step t, sample i: a pure function of (seed, t, i).

        A centred row whose entries all share a sign is zero (that group would get no update from this sample):
        only such rows are drawn again, from the same generator, so the cost does not grow with the number of
        groups (redrawing the whole Δ until every row is non-zero succeeds with probability (1 − 2^(1−K))^G).
        """
        key = ((self.seed * 1_000_003) * 1_000_033 + t) * 1_009 + i
        gen = torch.Generator().manual_seed(key % (1 << 63))
        delta = torch.randint(0, 2, self.x.shape, generator=gen, dtype=torch.int64).double() * 2 - 1
        direction = self.param.direction(delta)
        zero = direction.abs().sum(-1) == 0
        while bool(zero.any()):
            rows = torch.randint(0, 2, (int(zero.sum()), self.x.shape[-1]), generator=gen, dtype=torch.int64)
            delta[zero] = rows.double() * 2 - 1
            direction = self.param.direction(delta)
            zero = direction.abs().sum(-1) == 0
        return direction

    def estimate(self, loss_fn: LossFn, t: int, gather: LossGather = None) -> tuple[torch.Tensor, float, float]:
        """Average ĝ over this process's ``samples`` perturbations (one loss_fn call for all 2·samples models),
        or, with ``gather``, over the perturbations of every process.

        Negative ``t`` are calibration probes: their own Δ streams, with the perturbation size of step 0.
        """
        c = self.c_t(max(t, 0))
        alphas = []
        for i in range(self.sample_offset, self.sample_offset + self.samples):
            d = self.perturbation(t, i)
            alphas += [self.param.alpha(self.x + c * d), self.param.alpha(self.x - c * d)]
        losses = loss_fn(torch.stack(alphas)).double().cpu().reshape(1, -1)
        if gather is not None:  # every process's losses, in rank order: samples 0 … P·q − 1
            losses = gather(losses.reshape(-1)).double().cpu().reshape(-1, 2 * self.samples)
        losses = losses.reshape(-1)
        plus, minus = losses[0::2], losses[1::2]
        first = 0 if gather is not None else self.sample_offset
        grad = sum(((p - q) / (2 * c)) * self.perturbation(t, first + j)
                   for j, (p, q) in enumerate(zip(plus, minus))) / len(plus)
        return grad, float(plus.mean()), float(minus.mean())

    def calibrate(self, loss_fn: LossFn, first_move: float, probes: int = 4, gather: LossGather = None) -> float:
        """Set a so the first update moves each coordinate by about ``first_move`` (Spall's guideline).

        Uses ``probes`` gradient estimates at the start point (each loss_fn call may see a new batch).
        """
        mags = []
        for i in range(probes):
            grad, lp, lm = self.estimate(loss_fn, t=-(i + 1), gather=gather)  # t < 0: probe streams
            if not (math.isfinite(lp) and math.isfinite(lm)):
                raise NonFiniteLoss(
                    f"the target loss of the starting blend is not finite (L+ = {lp}, L− = {lm} at calibration "
                    f"probe {i + 1}): check the experts and the target data, or try --dtype float32.")
            mags.append(float(grad.abs().mean()))
        mag = sum(mags) / len(mags)
        self.a = first_move * (1 + self.A) ** 0.602 / max(mag, 1e-12)
        if self.max_move is None:
            self.max_move = 2 * first_move
        return self.a

    def step(self, loss_fn: LossFn, gather: LossGather = None) -> StepRecord:
        """One update; a step whose losses are not finite is rejected (α kept, gain halved) and counted."""
        gain, perturbation = self.a_t(self.t), self.c_t(self.t)
        grad, lp, lm = self.estimate(loss_fn, self.t, gather)
        rejected = not (math.isfinite(lp) and math.isfinite(lm) and bool(torch.isfinite(grad).all()))
        if rejected:
            self.rejections += 1
            if self.rejections >= self.MAX_REJECTIONS:
                raise NonFiniteLoss(
                    f"the target loss was not finite at step {self.t} and the {self.MAX_REJECTIONS - 1} steps "
                    f"before it, even with the perturbation and the gain halved each time (L+ = {lp}, L− = {lm}): try a smaller "
                    "--perturbation or --first-step, or --dtype float32.")
            self.a /= 2
            self.shrink /= 2
        else:
            self.rejections = 0
            move = self.a_t(self.t) * grad
            if self.max_move is not None:
                move = move.clamp(-self.max_move, self.max_move)
            self.x = self.param.project(self.x - move)
        if self.average_from is not None and self.t >= self.average_from:
            self.alpha_sum = self.alpha.clone() if self.alpha_sum is None else self.alpha_sum + self.alpha
            self.averaged_steps += 1
        record = StepRecord(self.t, lp, lm, self.alpha.clone(), rejected, gain, perturbation)
        self.t += 1
        return record

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this optimiser is (Δ is a function of the step)."""
        return {"x": self.x.tolist(), "t": self.t, "a": self.a, "max_move": self.max_move,
                "rejections": self.rejections, "shrink": self.shrink,
                "alpha_sum": None if self.alpha_sum is None else self.alpha_sum.tolist(),
                "averaged_steps": self.averaged_steps}

    def load_state_dict(self, state: dict) -> None:
        self.x = torch.tensor(state["x"], dtype=torch.float64)
        self.t, self.a, self.max_move = int(state["t"]), state["a"], state["max_move"]
        self.rejections, self.shrink = int(state["rejections"]), float(state["shrink"])
        total = state["alpha_sum"]
        self.alpha_sum = None if total is None else torch.tensor(total, dtype=torch.float64)
        self.averaged_steps = int(state["averaged_steps"])
