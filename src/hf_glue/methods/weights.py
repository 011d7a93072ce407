"""Given coefficients: α from --weights (e.g. to evaluate or re-apply a known blend)."""

from __future__ import annotations

import math

import torch

from ..errors import GlueError
from .base import MergeContext, MergeMethod, MethodOutput, register_method


def check_weights(weights, experts: int, bounds=None) -> list[float]:
    """One coefficient per expert: a convex combination (non-negative, summing to 1), or with ``bounds`` (task
    vectors, --combine) each within ``[lo, hi]``."""
    what = "within --bounds" if bounds else "summing to 1"
    if not weights:
        raise GlueError(f"method 'weights' needs --weights w1 w2 ... (one per expert, {what}).")
    if len(weights) != experts:
        raise GlueError(f"--weights has {len(weights)} values but there are {experts} experts; give one per expert.")
    if bounds:
        if not all(math.isfinite(w) and bounds[0] <= w <= bounds[1] for w in weights):
            raise GlueError(f"--weights must lie within --bounds {list(bounds)}; got {list(weights)}.")
    elif not all(math.isfinite(w) and w >= 0 for w in weights) or not abs(sum(weights) - 1.0) <= 1e-6:
        raise GlueError(f"--weights must be non-negative and sum to 1 (a convex combination); got {list(weights)}.")
    return [float(w) for w in weights]


@register_method
class Weights(MergeMethod):
    name = "weights"
    pretty_name = "Given coefficients"
    description = "coefficients given by the user (--weights)"

    def _run(self, ctx: MergeContext) -> MethodOutput:
        cfg = ctx.config
        weights = check_weights(cfg.weights, ctx.matrix.num_experts, cfg.bounds if cfg.space == "box" else None)
        alpha = torch.tensor(weights, dtype=torch.float64)
        return MethodOutput(alpha=alpha.repeat(ctx.matrix.num_groups, 1))
