"""Proxy-metric selection: all weight on the one expert that scores best alone on the target train data.

Scores: zero-shot target loss, accuracy, or LogME (You et al., 2021: the evidence of a Bayesian linear
model on the expert's penultimate features).
"""

from __future__ import annotations

import math

import torch

from ..errors import GlueError
from .base import MergeContext, MergeMethod, MethodOutput, register_method


@register_method
class Proxy(MergeMethod):
    name = "proxy"
    pretty_name = "Proxy-metric selection"
    description = "the single expert with the best proxy score (loss, accuracy or LogME) on target data"
    reference_url = "https://arxiv.org/abs/2102.11005"

    def _run(self, ctx: MergeContext) -> MethodOutput:
        cfg, matrix, objective = ctx.config, ctx.matrix, ctx.objective
        if cfg.proxy == "accuracy" and objective.task.primary_metric != "accuracy":
            raise GlueError(f"--proxy accuracy needs a classification task; {objective.task.name} has none. "
                            "Use --proxy loss.")
        if cfg.proxy == "logme" and objective.task.head_module(objective.model) is None:
            raise GlueError(f"--proxy logme needs a classification head; {objective.task.name} has none. "
                            "Use --proxy loss.")
        batches = [next(ctx.batches) for _ in range(cfg.proxy_batches)]
        k, g = matrix.num_experts, matrix.num_groups
        scores = []
        for expert in range(k):
            one_hot = torch.zeros(g, k, dtype=torch.float64)
            one_hot[:, expert] = 1.0
            if cfg.proxy == "logme":
                feats, labels = (torch.cat(parts) for parts in zip(*(objective.features(one_hot, b) for b in batches)))
                if cfg.parallel == "data":  # each process holds a shard of every batch: score all rows
                    feats, labels = objective.gather_rows(feats), objective.gather_rows(labels)
                scores.append(logme(feats, labels))
            else:
                metrics = objective.evaluate(one_hot, batches)
                scores.append(-metrics["loss"] if cfg.proxy == "loss" else metrics["accuracy"])
        best = max(range(k), key=lambda i: scores[i])
        alpha = torch.zeros(g, k, dtype=torch.float64)
        alpha[:, best] = 1.0
        label = {"loss": "negative loss", "accuracy": "accuracy", "logme": "LogME"}[cfg.proxy]
        return MethodOutput(alpha=alpha, details={
            "proxy": cfg.proxy,
            "proxy_scores": {name: float(s) for name, s in zip(matrix.expert_names, scores)},
            "proxy_score_meaning": f"{label} (higher is better)",
        })


def logme(features: torch.Tensor, labels: torch.Tensor, iterations: int = 100) -> float:
    """LogME (You et al., 2021): mean over classes of the per-sample log evidence of a Bayesian linear model
    mapping ``features[n, d]`` to the one-hot indicator of each class, with α, β set by evidence maximisation.

    The log-determinant is the exact log|αI + βFᵀF| over all d feature dimensions: Σ log(α + βσ_i²) over the
    min(n, d) singular values plus (d − min(n, d))·log α for the rest, as in the reference implementation's
    ``_fit_icml`` (thuml/LogME, eigenvalues of FᵀF). Its default fixed-point fit keeps, when d ≥ n, only the n
    singular values of F and drops the other dimensions' log α, so there its per-class evidence is higher than
    ours by (d − n)·log α / (2n); when n > d it drops only singular values below 1e-10.
    """
    f = features.double().reshape(features.shape[0], -1)
    n, d = f.shape
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    sigma = s ** 2
    evidences = []
    for cls in torch.unique(labels):
        y = (labels == cls).double()
        x = u.T @ y
        x2 = x ** 2
        res_x2 = float(y @ y - x2.sum())  # the part of y outside the span of the features
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t < 1e-2:
                break
        log_det = float(torch.log(alpha + beta * sigma).sum()) + (d - sigma.numel()) * math.log(alpha)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * log_det - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n)
    return sum(evidences) / len(evidences)
