"""Uniform averaging (a model soup): α_k = 1/K, no data needed."""

from __future__ import annotations

import torch

from .base import MergeContext, MergeMethod, MethodOutput, register_method


@register_method
class Uniform(MergeMethod):
    name = "uniform"
    pretty_name = "Uniform average"
    description = "every expert weighted 1/K"

    def _run(self, ctx: MergeContext) -> MethodOutput:
        k = ctx.matrix.num_experts
        return MethodOutput(alpha=torch.full((ctx.matrix.num_groups, k), 1.0 / k, dtype=torch.float64))
