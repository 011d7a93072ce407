"""Two-point SPSA on the probability simplex: a pure optimiser that only sees a loss callable.

At step t: Δ_t ~ Rademacher (seeded by (seed, t), identical on every process), c_t = c / (t+1)^γ,
a_t = a / (t+1+A)^0.602, L± = loss(θ(α(x ± c_t Δ_t))) on the same batch, ĝ = (L+ − L−)/(2c_t) · Δ_t,
x ← x − a_t ĝ. ``simplex`` works on α itself (Δ centred so α ± cΔ keeps Σα = 1, projection after each
update); ``softmax`` works on logits w with α = softmax(w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: A loss callable: coefficient sets ``[M, G, K]`` → losses ``[M]`` (all on the same minibatch).
LossFn = Callable[[torch.Tensor], torch.Tensor]
#: Optional hook averaging a gradient estimate across processes (perturbation-parallel runs).
GradReducer = Optional[Callable[[torch.Tensor], torch.Tensor]]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (Duchi et al., 2008)."""
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


PARAMETRIZATIONS = {p.name: p for p in (SimplexParametrization(), SoftmaxParametrization())}


@dataclass
class StepRecord:
    """What one SPSA step measured: mean L± over its samples and the coefficients after the update."""

    step: int
    loss_plus: float
    loss_minus: float
    alpha: torch.Tensor


class SPSA:
    """Two-point SPSA with Spall's gain sequences; ``a`` may be calibrated from probe measurements."""

    def __init__(
        self,
        alpha0: torch.Tensor,
        parametrization: str = "simplex",
        *,
        c: float = 0.05,
        gamma: float = 0.101,
        a: Optional[float] = None,
        A: float = 10.0,
        seed: int = 0,
        samples: int = 1,
        stream: int = 0,
        max_move: Optional[float] = None,
    ) -> None:
        self.param = PARAMETRIZATIONS[parametrization]
        self.x = self.param.init(alpha0.double())
        self.c, self.gamma, self.a, self.A = c, gamma, a, A
        self.seed, self.samples, self.stream = seed, samples, stream
        self.max_move = max_move
        self.t = 0

    @property
    def alpha(self) -> torch.Tensor:
        return self.param.alpha(self.x)

    def c_t(self, t: int) -> float:
        return self.c / (t + 1) ** self.gamma

    def a_t(self, t: int) -> float:
        if self.a is None:
            raise RuntimeError("SPSA gain a is not set: pass a= or call calibrate() first.")
        return self.a / (t + 1 + self.A) ** 0.602

    def perturbation(self, t: int, i: int = 0) -> torch.Tensor:
        """Rademacher Δ (as a direction) for step t, sample i: a pure function of (seed, stream, t, i)."""
        key = ((self.seed * 1_000_003 + self.stream) * 1_000_033 + t) * 1_009 + i
        gen = torch.Generator().manual_seed(key % (1 << 63))
        while True:
            delta = torch.randint(0, 2, self.x.shape, generator=gen, dtype=torch.int64).double() * 2 - 1
            direction = self.param.direction(delta)
            # a centred Δ whose entries all share a sign is zero: draw again (deterministically)
            if bool((direction.abs().sum(-1) > 0).all()):
                return direction

    def estimate(self, loss_fn: LossFn, t: int, reduce_grad: GradReducer = None) -> tuple[torch.Tensor, float, float]:
        """Average ĝ over ``samples`` perturbations; all 2·samples models are evaluated in one call.

        Negative ``t`` are calibration probes: their own Δ streams, with the perturbation size of step 0.
        """
        c = self.c_t(max(t, 0))
        deltas = [self.perturbation(t, i) for i in range(self.samples)]
        alphas = []
        for d in deltas:
            alphas += [self.param.alpha(self.x + c * d), self.param.alpha(self.x - c * d)]
        losses = loss_fn(torch.stack(alphas)).double().cpu()
        plus, minus = losses[0::2], losses[1::2]
        grad = sum(((p - q) / (2 * c)) * d for p, q, d in zip(plus, minus, deltas)) / self.samples
        if reduce_grad is not None:  # perturbation-parallel: average the estimates of all processes
            grad = reduce_grad(grad)
        return grad, float(plus.mean()), float(minus.mean())

    def calibrate(
        self, loss_fn: LossFn, first_move: float, probes: int = 4, reduce_grad: GradReducer = None
    ) -> float:
        """Set a so the first update moves each coordinate by about ``first_move`` (Spall's guideline).

        Uses ``probes`` gradient estimates at the start point (each loss_fn call may see a new batch).
        """
        mags = []
        for i in range(probes):
            grad, _, _ = self.estimate(loss_fn, t=-(i + 1), reduce_grad=reduce_grad)  # t < 0: probe streams
            mags.append(float(grad.abs().mean()))
        mag = sum(mags) / len(mags)
        self.a = first_move * (1 + self.A) ** 0.602 / max(mag, 1e-12)
        if self.max_move is None:
            self.max_move = 2 * first_move
        return self.a

    def step(self, loss_fn: LossFn, reduce_grad: GradReducer = None) -> StepRecord:
        grad, lp, lm = self.estimate(loss_fn, self.t, reduce_grad)
        move = self.a_t(self.t) * grad
        if self.max_move is not None:
            move = move.clamp(-self.max_move, self.max_move)
        self.x = self.param.project(self.x - move)
        record = StepRecord(self.t, lp, lm, self.alpha.clone())
        self.t += 1
        return record
