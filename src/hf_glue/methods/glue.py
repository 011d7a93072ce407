"""GLUE: α learned on the target by two-point SPSA, two forward passes a step, no backprop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from ..errors import GlueError
from ..io.checkpoint import SearchInterrupted, stop_signals
from ..optim.spsa import SPSA, NonFiniteLoss, make_parametrization
from ..io.progress import progress
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
        phases = search_phases(cfg, matrix.num_groups)

        def optimiser(phase: int, alpha0: torch.Tensor) -> SPSA:
            steps = phases[phase].steps
            return SPSA(
                alpha0,
                make_parametrization(cfg.space, cfg.bounds),
                c=cfg.c,
                gamma=cfg.perturbation_decay,
                a=cfg.gain,
                A=cfg.A,
                seed=cfg.seed + PHASE_SEED * phase,  # the later phase draws its own perturbations
                samples=cfg.spsa_samples,
                # perturbation-parallel: process p evaluates samples p·q … p·q + q − 1 of every step
                sample_offset=acc.process_index * cfg.spsa_samples if perturbation_parallel else 0,
                average_from=steps - math.ceil(cfg.average_last * steps) if cfg.average_last > 0 else None,
            )

        gather = None
        if perturbation_parallel:
            def gather(losses: torch.Tensor) -> torch.Tensor:
                return acc.gather(losses.to(acc.device))  # [P·2q], in rank order

        batches = CountingIterator(ctx.batches)
        phase = 0

        def loss_fn(alphas: torch.Tensor) -> torch.Tensor:
            # a model-wide phase of --granularity auto searches one row, shared by every group of the engine;
            # data-parallel: the global batch's losses (summed over processes); perturbation-parallel: this
            # process's models on the shared batch, gathered by the optimiser
            if alphas.shape[-2] != matrix.num_groups:
                alphas = alphas.expand(-1, matrix.num_groups, -1).contiguous()
            return ctx.objective.losses(alphas, next(batches), reduce=not perturbation_parallel)

        def full(alpha: torch.Tensor) -> torch.Tensor:
            return alpha.expand(matrix.num_groups, -1).clone()

        spsa = optimiser(0, initial_alpha(cfg, phases[0].groups, matrix.num_experts))
        ckpt = ctx.checkpoint
        history: list[dict] = []
        details: dict = {}
        prior = {"forward_passes": 0, "seconds": 0.0}  # what the search cost before a resume
        start, passes = time.perf_counter(), ctx.objective.forward_passes
        if ckpt is not None and cfg.resume:
            state = ckpt.load()
            phase = state.get("phase", 0)
            if phase > 0:
                spsa = optimiser(phase, torch.zeros(phases[phase].groups, matrix.num_experts, dtype=torch.float64))
            spsa.load_state_dict(state["spsa"])
            history, details, prior = state["history"], state["details"], state["cost"]
            if ctx.selection is not None and state.get("selection"):
                ctx.selection.load_state_dict(state["selection"])  # the starts' scores: not paid twice
            batches.skip(state["batches"])
            details["resumed_at_step"] = sum(p.steps for p in phases[:phase]) + spsa.t
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
                start_alpha, details["screening"] = best.alpha[:phases[0].groups], \
                    {"on": "validation rows", "chosen": best.name}
                if cfg.space == "softmax":
                    # a one-hot start is a logit of log(0): softmax's gradient there is ~0 and the search would
                    # never leave it; keep a tenth of the mass spread evenly
                    start_alpha = 0.9 * start_alpha + 0.1 / matrix.num_experts
                spsa.restart(start_alpha)
                details["start"] = matrix.summarize(full(start_alpha))
            if at_start:
                details["calibrated_gain"] = self._calibrate(spsa, loss_fn, cfg, gather)
            if len(phases) > 1:
                details["phases"] = [{"coefficients": "model-wide" if p.groups == 1 else "per group",
                                      "groups": p.groups, "steps": p.steps} for p in phases]

        def save() -> None:
            if ckpt is not None:
                cost = {"forward_passes": prior["forward_passes"] + ctx.objective.forward_passes - passes,
                        "seconds": prior["seconds"] + time.perf_counter() - start}
                ckpt.save({"spsa": spsa.state_dict(), "history": history, "details": details, "phase": phase,
                           "batches": batches.count, "cost": cost,
                           "selection": ctx.selection.state_dict() if ctx.selection is not None else None})

        # name → α ([G, K] lists), the search's candidates, kept across --resume
        proposed = details.setdefault("proposals", {})
        with stop_signals() as stop:
            while True:
                label = phases[phase].label(len(phases))
                done = sum(p.steps for p in phases[:phase])
                snapshots = snapshot_steps(phases[phase].steps)
                bar = progress(range(spsa.t, phases[phase].steps), f"GLUE (SPSA{label})", initial=spsa.t,
                               total=phases[phase].steps, disable=not ctx.is_main_process)
                for _ in bar:
                    try:
                        rec = spsa.step(loss_fn, gather=gather)
                    except NonFiniteLoss as err:
                        raise GlueError(str(err)) from None
                    coefficients = matrix.summarize(full(rec.alpha))
                    history.append({"step": done + rec.step, "loss_plus": rec.loss_plus,
                                    "loss_minus": rec.loss_minus, "gain": rec.gain, "perturbation": rec.perturbation,
                                    "coefficients": coefficients, **({"rejected": True} if rec.rejected else {}),
                                    **({"phase": phase} if len(phases) > 1 else {})})
                    ctx.log_step(history[-1])
                    if spsa.t in snapshots:
                        proposed[f"search{label}: step {done + spsa.t}"] = full(rec.alpha).tolist()
                    bar.set_postfix_str(f"loss={(rec.loss_plus + rec.loss_minus) / 2:.4f} "
                                        f"α=[{' '.join(f'{v:.2f}' for v in coefficients.values())}]")
                    signum = _agreed_signal(stop.signum, acc)
                    if signum is not None or (ckpt is not None and ckpt.due(done + spsa.t)
                                              and done + spsa.t < cfg.steps):
                        save()
                    if signum is not None:
                        bar.close()
                        raise SearchInterrupted(done + spsa.t, cfg.steps, signum,
                                                ckpt.folder if ckpt is not None else None)
                proposed[f"search{label}: last iterate (step {done + spsa.t})"] = full(spsa.alpha).tolist()
                if spsa.averaged_steps:
                    details.setdefault("averaged_steps", []).append(spsa.averaged_steps)
                    proposed[f"search{label}: mean of the last {spsa.averaged_steps} iterates"] = \
                        full(spsa.result).tolist()
                if phase + 1 == len(phases):
                    break
                # the next, finer phase starts from the best candidate so far (on the validation rows), with a gain
                # sized there as --granularity block sizes its own at --init: per-group gradient estimates are
                # smaller than the model-wide ones (each group's share of the loss change), and the model-wide gain
                # would move each group about 1/√G as far
                if ctx.selection is not None:
                    best = ctx.selection.choose(_tensors(proposed))
                    restart, details["phases"][phase + 1]["start"] = best.alpha, best.name
                else:
                    restart = full(spsa.result)
                if cfg.space == "softmax" and float(restart.min()) < 1e-3:
                    restart = 0.9 * restart + 0.1 / matrix.num_experts  # off a vertex, as the first start
                phase, shrink = phase + 1, spsa.shrink
                spsa = optimiser(phase, restart)
                spsa.shrink = shrink  # a rejected step's caution carries over
                if spsa.a is None:
                    details["phases"][phase]["calibrated_gain"] = self._calibrate(spsa, loss_fn, cfg, gather)
        proposals = _tensors(details.pop("proposals"))
        if len(details.get("averaged_steps", [])) == 1:
            details["averaged_steps"] = details["averaged_steps"][0]
        return MethodOutput(alpha=spsa.result.clone().expand(matrix.num_groups, -1).clone(), history=history,
                            details=details, prior_forward_passes=prior["forward_passes"],
                            prior_seconds=prior["seconds"], proposals=proposals)

    @staticmethod
    def _calibrate(spsa: SPSA, loss_fn, cfg, gather) -> float:
        try:
            return spsa.calibrate(loss_fn, cfg.first_move, cfg.calibration_samples, gather=gather)
        except NonFiniteLoss as err:
            raise GlueError(str(err)) from None


@dataclass(frozen=True)
class Phase:
    """One stretch of the search: its coefficient rows (1: one α shared by every group) and its steps."""

    groups: int
    steps: int

    def label(self, phases: int) -> str:
        """How the phase's candidates are named when there are several phases."""
        return "" if phases == 1 else (", model-wide" if self.groups == 1 else ", per group")


#: added to --seed per phase, so a later phase draws other perturbations than the first
PHASE_SEED = 7919


def search_phases(cfg: GlueConfig, groups: int) -> list[Phase]:
    """One phase at the engine's granularity; --granularity auto: half the steps model-wide, then the rest per
    group (block, or module for adapters), started from the best candidate of the first half; the second phase's
    gain calibration (--gain unset) is paid from its steps, so the forward passes are those of one search."""
    if cfg.granularity != "auto" or groups == 1:
        return [Phase(groups, cfg.steps)]
    first = math.ceil(cfg.steps / 2)
    second = cfg.steps - first - (cfg.calibration_samples if cfg.gain is None else 0)
    return [Phase(1, first), Phase(groups, second)] if second > 0 else [Phase(1, cfg.steps)]


def _tensors(proposed: dict) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(alpha, dtype=torch.float64) for name, alpha in proposed.items()}


def _agreed_signal(signum, acc):
    """The stop signal if any process received one (all processes stop after the same step)."""
    if acc is None or acc.num_processes == 1:
        return signum
    flag = int(acc.gather(torch.tensor([signum or 0], device=acc.device)).max())
    return flag or None
