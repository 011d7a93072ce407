"""NGOpt: α learned on the target by nevergrad's optimiser wizard (LoraHub's optimiser), on GLUE's budget."""

from __future__ import annotations

from ..config import GlueConfig
from ..optim.blackbox import NGOpt, models_per_call, run_search
from .base import MergeContext, MergeMethod, MethodOutput, register_method


@register_method
class Nevergrad(MergeMethod):
    name = "nevergrad"
    seeded = True
    selects = True
    pretty_name = "NGOpt (nevergrad)"
    description = ("coefficients learned on the target data by nevergrad's NGOpt (as in LoraHub), one forward "
                   "pass per candidate, with GLUE's forward-pass budget")
    reference_url = "https://arxiv.org/abs/2307.13269"

    packages = ("nevergrad",)

    def check_available(self) -> None:
        NGOpt.require()

    def models_per_step(self, config: GlueConfig) -> int:
        return models_per_call(config)

    def _run(self, ctx: MergeContext) -> MethodOutput:
        return run_search(ctx, NGOpt, "NGOpt")
