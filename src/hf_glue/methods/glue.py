"""GLUE: α learned on the target by two-point SPSA, two forward passes a step, no backprop."""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..errors import GlueError
from ..io.checkpoint import SearchInterrupted, stop_signals
from ..optim.spsa import SPSA, NonFiniteLoss, make_parametrization
from ..config import GlueConfig
from .base import MergeContext, MergeMethod, MethodOutput, initial_alpha, register_method
from .selection import snapshot_steps


class CountingIterator:
    """Counts the batches drawn, so a resumed run can skip exactly those and see the same data order."""

    def __init__(self, batches: Iterator[dict]) -> None:
        self.batches, self.count = batches, 0

    def __next__(self) -> dict:
        self.count += 1
        return next(self.batches)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self)


@register_method
class Glue(MergeMethod):
    name = "glue"
    seeded = True
    selects = True
    pretty_name = "GLUE (gradient-free SPSA)"
    description = "coefficients learned on the target data by two-point SPSA (two forward passes a step)"
    reference_url = "https://arxiv.org/abs/2512.22467"

    def models_per_step(self, config: GlueConfig) -> int:
        return 2 * config.spsa_samples

    @staticmethod
    def forward_passes(config: GlueConfig) -> int:
        """Forward passes of a search with ``config`` on train batches: 2q per SPSA step and 2q per gain-calibration
        probe (--gain unset). Scoring the candidates on the validation rows (`selection.Selection`: the simple
        starts the screening picks from, and the search's iterates) comes on top, the same for every searching
        method."""
        passes = 2 * config.spsa_samples * config.steps
        if config.gain is None:
            passes += 2 * config.spsa_samples * config.calibration_samples
        return passes

    def _run(self, ctx: MergeContext) -> MethodOutput:
        cfg, matrix, acc = ctx.config, ctx.matrix, ctx.accelerator
        processes = acc.num_processes if acc is not None else 1
        perturbation_parallel = cfg.parallel == "perturbation" and processes > 1
        spsa = SPSA(
            initial_alpha(cfg, matrix.num_groups, matrix.num_experts),
            make_parametrization(cfg.space, cfg.bounds),
            c=cfg.c,
            gamma=cfg.perturbation_decay,
            a=cfg.gain,
            A=cfg.A,
            seed=cfg.seed,
            samples=cfg.spsa_samples,
            # perturbation-parallel: process p evaluates samples p·q … p·q + q − 1 of every step
            sample_offset=acc.process_index * cfg.spsa_samples if perturbation_parallel else 0,
            average_from=cfg.steps - math.ceil(cfg.average_last * cfg.steps) if cfg.average_last > 0 else None,
        )
        gather = None
        if perturbation_parallel:
            def gather(losses: torch.Tensor) -> torch.Tensor:
                return acc.gather(losses.to(acc.device))  # [P·2q], in rank order

        batches = CountingIterator(ctx.batches)

        def loss_fn(alphas: torch.Tensor) -> torch.Tensor:
            # data-parallel: the global batch's losses (summed over processes); perturbation-parallel: this
            # process's models on the shared batch, gathered by the optimiser
            return ctx.objective.losses(alphas, next(batches), reduce=not perturbation_parallel)

        ckpt = ctx.checkpoint
        history: list[dict] = []
        details: dict = {}
        prior = {"forward_passes": 0, "seconds": 0.0}  # what the search cost before a resume
        start, passes = time.perf_counter(), ctx.objective.forward_passes
        if ckpt is not None and cfg.resume:
            state = ckpt.load()
            spsa.load_state_dict(state["spsa"])
            history, details, prior = state["history"], state["details"], state["cost"]
            if ctx.selection is not None and state.get("selection"):
                ctx.selection.load_state_dict(state["selection"])  # the starts' scores: not paid twice
            batches.skip(state["batches"])
            details["resumed_at_step"] = spsa.t
        else:
            # the gain is sized at --init, before the start moves: at a screened start near the optimum the gradient
            # is mostly noise and a gain sized there threw the search far from it. Softmax is sized where it starts
            # (its logit gradients shrink near a vertex, so a gain sized at uniform would barely move it), and so is
            # a search whose --init blend has no finite loss
            at_start = spsa.a is None and cfg.space == "softmax"
            if spsa.a is None and not at_start:
                try:
                    details["calibrated_gain"] = spsa.calibrate(loss_fn, cfg.first_move, cfg.calibration_samples,
                                                                gather=gather)
                except NonFiniteLoss:
                    at_start = True
            if cfg.screen_batches > 0 and ctx.selection is not None:  # the simple starts, on the validation rows
                best = ctx.selection.best_start()
                start_alpha, details["screening"] = best.alpha, {"on": "validation rows", "chosen": best.name}
                if cfg.space == "softmax":
                    # a one-hot start is a logit of log(0): softmax's gradient there is ~0 and the search would
                    # never leave it; keep a tenth of the mass spread evenly
                    start_alpha = 0.9 * start_alpha + 0.1 / matrix.num_experts
                spsa.restart(start_alpha)
                details["start"] = matrix.summarize(start_alpha)
            if at_start:
                details["calibrated_gain"] = self._calibrate(spsa, loss_fn, cfg, gather)

        def save() -> None:
            if ckpt is not None:
                cost = {"forward_passes": prior["forward_passes"] + ctx.objective.forward_passes - passes,
                        "seconds": prior["seconds"] + time.perf_counter() - start}
                ckpt.save({"spsa": spsa.state_dict(), "history": history, "details": details,
                           "batches": batches.count, "cost": cost,
                           "selection": ctx.selection.state_dict() if ctx.selection is not None else None})

        snapshots = snapshot_steps(cfg.steps)
        iterates = details.setdefault("iterates", {})  # step → α, the search's candidates (kept across --resume)
        bar = tqdm(range(spsa.t, cfg.steps), desc="GLUE (SPSA)", disable=not ctx.is_main_process,
                   dynamic_ncols=True, initial=spsa.t, total=cfg.steps)
        with stop_signals() as stop:
            for _ in bar:
                try:
                    rec = spsa.step(loss_fn, gather=gather)
                except NonFiniteLoss as err:
                    raise GlueError(str(err)) from None
                coefficients = matrix.summarize(rec.alpha)
                history.append({"step": rec.step, "loss_plus": rec.loss_plus, "loss_minus": rec.loss_minus,
                                "gain": rec.gain, "perturbation": rec.perturbation, "coefficients": coefficients,
                                **({"rejected": True} if rec.rejected else {})})
                ctx.log_step(history[-1])
                if spsa.t in snapshots:
                    iterates[str(spsa.t)] = rec.alpha.tolist()
                bar.set_postfix_str(f"loss={(rec.loss_plus + rec.loss_minus) / 2:.4f} "
                                    f"α=[{' '.join(f'{v:.2f}' for v in coefficients.values())}]")
                signum = _agreed_signal(stop.signum, acc)
                if signum is not None or (ckpt is not None and ckpt.due(spsa.t) and spsa.t < cfg.steps):
                    save()
                if signum is not None:
                    bar.close()
                    raise SearchInterrupted(spsa.t, cfg.steps, signum, ckpt.folder if ckpt is not None else None)
        proposals = {f"search: step {t}": torch.tensor(a, dtype=torch.float64)
                     for t, a in details.pop("iterates").items()}
        proposals[f"search: last iterate (step {spsa.t})"] = spsa.alpha.clone()
        if spsa.averaged_steps:
            details["averaged_steps"] = spsa.averaged_steps  # the mean α of the last steps' iterates
            proposals[f"search: mean of the last {spsa.averaged_steps} iterates"] = spsa.result.clone()
        return MethodOutput(alpha=spsa.result.clone(), history=history, details=details,
                            prior_forward_passes=prior["forward_passes"], prior_seconds=prior["seconds"],
                            proposals=proposals)

    @staticmethod
    def _calibrate(spsa: SPSA, loss_fn, cfg, gather) -> float:
        try:
            return spsa.calibrate(loss_fn, cfg.first_move, cfg.calibration_samples, gather=gather)
        except NonFiniteLoss as err:
            raise GlueError(str(err)) from None


def _agreed_signal(signum, acc):
    """The stop signal if any process received one (all processes stop after the same step)."""
    if acc is None or acc.num_processes == 1:
        return signum
    flag = int(acc.gather(torch.tensor([signum or 0], device=acc.device)).max())
    return flag or None
