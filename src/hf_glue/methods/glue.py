"""GLUE: α learned on the target by two-point SPSA, two forward passes a step, no backprop."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..optim.spsa import SPSA
from .base import MergeContext, MergeMethod, MethodOutput, initial_alpha, register_method


@register_method
class Glue(MergeMethod):
    name = "glue"
    pretty_name = "GLUE (gradient-free SPSA)"
    description = "coefficients learned on the target data by two-point SPSA (two forward passes a step)"
    reference_url = "https://arxiv.org/abs/2512.22467"

    def _run(self, ctx: MergeContext) -> MethodOutput:
        cfg, matrix = ctx.config, ctx.matrix
        acc = ctx.accelerator
        perturbation_parallel = cfg.parallel == "perturbation" and acc is not None and acc.num_processes > 1
        spsa = SPSA(
            initial_alpha(cfg, matrix.num_groups, matrix.num_experts),
            cfg.parametrization,
            c=cfg.c,
            gamma=cfg.perturbation_decay,
            a=cfg.gain,
            A=cfg.A,
            seed=cfg.seed,
            samples=cfg.spsa_samples,
            stream=acc.process_index if perturbation_parallel else 0,
        )
        reduce_grad = None
        if perturbation_parallel:
            def reduce_grad(g: torch.Tensor) -> torch.Tensor:
                return acc.reduce(g.to(acc.device), reduction="mean").cpu().double()

        def loss_fn(alphas: torch.Tensor) -> torch.Tensor:
            return ctx.objective.losses(alphas, next(ctx.batches))

        details = {}
        if spsa.a is None:
            details["calibrated_gain"] = spsa.calibrate(
                loss_fn, cfg.first_move, cfg.calibration_samples, reduce_grad=reduce_grad
            )
        history = []
        bar = tqdm(range(cfg.steps), desc="GLUE (SPSA)", disable=not ctx.is_main_process, dynamic_ncols=True)
        for _ in bar:
            rec = spsa.step(loss_fn, reduce_grad=reduce_grad)
            coefficients = matrix.summarize(rec.alpha)
            history.append({
                "step": rec.step,
                "loss_plus": rec.loss_plus,
                "loss_minus": rec.loss_minus,
                "coefficients": coefficients,
            })
            bar.set_postfix_str(
                f"loss={(rec.loss_plus + rec.loss_minus) / 2:.4f} α=[{' '.join(f'{v:.2f}' for v in coefficients.values())}]"
            )
        return MethodOutput(alpha=spsa.alpha.clone(), history=history, details=details)
