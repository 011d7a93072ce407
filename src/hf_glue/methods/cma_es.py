"""CMA-ES: α learned on the target by pycma's evolution strategy (mergekit-evolve's optimiser), on GLUE's budget."""

from __future__ import annotations

from ..config import GlueConfig
from ..optim.blackbox import CMAES, models_per_call, run_search
from .base import MergeContext, MergeMethod, MethodOutput, register_method


@register_method
class CmaEs(MergeMethod):
    name = "cma"
    seeded = True
    selects = True
    pretty_name = "CMA-ES"
    description = ("coefficients learned on the target data by CMA-ES (pycma, as in mergekit-evolve), one forward "
                   "pass per candidate, with GLUE's forward-pass budget")
    reference_url = "https://arxiv.org/abs/2403.13187"

    packages = ("cma",)

    def check_available(self) -> None:
        CMAES.require()

    def models_per_step(self, config: GlueConfig) -> int:
        return models_per_call(config)

    def _run(self, ctx: MergeContext) -> MethodOutput:
        return run_search(ctx, CMAES, "CMA-ES")
