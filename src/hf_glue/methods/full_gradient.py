"""Full-gradient mixing: the same coefficients optimised with Adam by backpropagating the target loss
through the blend (the expensive reference GLUE is compared with). With the simplex parametrisation the
gradient is projected onto the simplex's tangent plane before Adam, and α onto the simplex after each step."""

from __future__ import annotations

import torch

from ..io.progress import progress
from ..optim.spsa import Parametrization, make_parametrization
from .base import MergeContext, MergeMethod, MethodOutput, initial_alpha, register_method


def loss_and_grad(objective, param: Parametrization, x: torch.Tensor, batch: dict) -> tuple[float, torch.Tensor]:
    """Global mean target loss of θ(α(x)) and its gradient with respect to x (summed over processes)."""
    x = x.detach().clone().requires_grad_(True)
    local, value = objective.differentiable_loss(param.alpha(x), batch)
    local.backward()
    grad = x.grad
    acc = objective.accelerator
    if acc is not None and acc.num_processes > 1:
        grad = acc.reduce(grad.to(acc.device), reduction="sum").cpu()
    return value, grad


@register_method
class FullGradient(MergeMethod):
    name = "full-gradient"
    seeded = True
    pretty_name = "Full-gradient mixing"
    description = "coefficients optimised with Adam by backpropagating the target loss through the blend"

    def _run(self, ctx: MergeContext) -> MethodOutput:
        cfg, matrix = ctx.config, ctx.matrix
        param = make_parametrization(cfg.space, cfg.bounds)
        x = param.init(initial_alpha(cfg, matrix.num_groups, matrix.num_experts)).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=cfg.adam_lr)
        history = []
        bar = progress(range(cfg.steps), "Full-gradient", disable=not ctx.is_main_process)
        for step in bar:
            value, grad = loss_and_grad(ctx.objective, param, x, next(ctx.batches))
            optimizer.zero_grad()
            # simplex: only the tangent part (Σ = 0); else Adam's per-coordinate scaling turns the common
            # component into an equal move on every α that the projection then undoes
            x.grad = param.tangent(grad).to(x.dtype)
            optimizer.step()
            with torch.no_grad():
                x.copy_(param.project(x))
            coefficients = matrix.summarize(param.alpha(x))
            history.append({"step": step, "loss": value, "coefficients": coefficients})
            ctx.log_step(history[-1])
            bar.set_postfix_str(f"loss={value:.4f} α=[{' '.join(f'{v:.2f}' for v in coefficients.values())}]")
        return MethodOutput(alpha=param.alpha(x).detach().clone(), history=history, backward_passes=cfg.steps)
