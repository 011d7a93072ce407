"""Data-size weighting (FedAvg-style): α_k ∝ n_k, the number of examples expert k was trained on."""

from __future__ import annotations

import torch

from .base import MergeContext, MergeMethod, MethodOutput, check_data_sizes, register_method


@register_method
class DataSize(MergeMethod):
    name = "data-size"
    pretty_name = "Data-size weighting"
    description = "each expert weighted by the size of its training set (FedAvg-style), no target data used"
    reference_url = "https://arxiv.org/abs/1602.05629"

    def _run(self, ctx: MergeContext) -> MethodOutput:
        sizes = torch.tensor(check_data_sizes(ctx.config, ctx.matrix.num_experts), dtype=torch.float64)
        return MethodOutput(alpha=(sizes / sizes.sum()).repeat(ctx.matrix.num_groups, 1))
