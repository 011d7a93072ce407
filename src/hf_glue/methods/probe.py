"""--select probe: the answer chosen for fine-tuning, by a few gradient steps from each of the best candidates.

When fine-tuning is long, the merged loss ranks starts poorly (docs/results.md, "When does the start matter"): a
few fine-tuning steps from each start rank them better. The probe takes the `--probe-candidates` candidates with
the lowest validation loss (the simple starts and the search's iterates alike), trains each for `--probe-steps`
AdamW steps on the same train batches, and keeps the one whose validation loss is lowest after them. The weights it
trained are thrown away: the answer is still a blend θ(α), fine-tuned afterwards as usual.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch

from .selection import Candidate, Selection


def probe(selection: Selection, objective, train_batches: list[dict], validation: Callable[[], Iterable[dict]],
          candidates: int, learning_rate: float) -> tuple[Candidate, dict]:
    """Train the ``candidates`` best-scored candidates on ``train_batches`` (one AdamW step per batch, from θ(α),
    the same batches for every candidate) and return the one with the lowest validation loss after them, with the
    record merge_result.json keeps (``details.probe``)."""
    start, passes = time.perf_counter(), objective.forward_passes
    ranked, seen = [], []
    for c in sorted((c for c in selection.scored if math.isfinite(c.loss)), key=lambda c: c.loss):
        if not any(torch.equal(c.alpha, s) for s in seen):
            ranked.append(c)
            seen.append(c.alpha)
        if len(ranked) == candidates:
            break
    scores = []
    for candidate in ranked:
        params = trainable_params(objective, candidate.alpha)
        optimiser = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=learning_rate,
                                      weight_decay=0.0)
        for batch in train_batches:
            stats = objective.params_stats(params, batch)
            optimiser.zero_grad(set_to_none=True)
            (stats["loss_sum"] / stats["count"]).backward()
            optimiser.step()
        with torch.no_grad():
            after = objective.evaluate_params(params, validation()).get("loss", math.inf)
        scores.append(after if math.isfinite(after) else math.inf)
        del params, optimiser
    best = min(range(len(ranked)), key=lambda i: scores[i])  # the first of equals: the lower loss before
    record = {
        "steps": len(train_batches),
        "learning_rate": learning_rate,
        "chosen": ranked[best].name,
        "forward_passes": objective.forward_passes - passes,
        "backward_passes": len(ranked) * len(train_batches),
        "seconds": time.perf_counter() - start,
        "candidates": [{"name": c.name, "loss_before": c.loss, "loss_after": s if math.isfinite(s) else None}
                       for c, s in zip(ranked, scores)],
    }
    return ranked[best], record


def trainable_params(objective, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """θ(α) as standalone tensors the template runs with (`Objective.params_stats`): floating ones trainable
    (in the search's dtype: float32 for half-precision experts), buffers and integer tensors as they are."""
    matrix = objective.matrix
    alpha = alpha.reshape(1, matrix.num_groups, matrix.num_experts).to(matrix.device, torch.float32)
    with torch.no_grad():
        blended = next(iter(matrix.models(alpha)))
        params = {k: v.detach().clone() for k, v in blended.items()}
    for name, tensor in params.items():
        if tensor.is_floating_point() and name not in objective.buffer_names:
            tensor.requires_grad_(True)
    return params
