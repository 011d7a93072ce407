"""Task-vector processing for linear merges: TIES trimming and sign election, DARE drop-and-rescale.

A task vector is an expert's delta from the base, τ_k = θ_k − θ_base. :func:`process_deltas` takes the K deltas
of ONE tensor, stacked as ``deltas[K, ...]``, and returns the processed τ̂_k used by the linear merge
θ = θ_base + Σ_k λ_k τ̂_k. Methods carry mergekit's names and definitions (mergekit 0.1.5,
``merge_methods/generalized_task_arithmetic.py`` and ``sparsify.py``):

- ``task-arithmetic``: τ̂ = τ.
- ``ties`` (mergekit ``ties``): keep the k = max(1, int(density · numel)) largest |τ_k| of each expert over the
  flattened tensor (density ≥ 1 keeps all), elect a sign per element as sign(Σ_k w_k τ_k) over the trimmed,
  weighted deltas (a sum of exactly 0 elects +), and keep τ_k only where sign(w_k τ_k) equals it.
- ``dare`` (mergekit ``dare_linear``): keep each element with probability ``density``, kept values divided by
  ``density``; no election.
- ``dare-ties`` (mergekit ``dare_ties``): the DARE drop, then the TIES election.

There is no ``normalize`` division: hf-glue learns the λ's, so with λ_k = mergekit's weights the merge equals
mergekit's output with ``normalize: false`` and ``lambda: 1`` (mergekit's ``ties`` defaults to ``normalize:
true``, which divides by Σ_k w_k·mask_k per element). The election uses the weights passed in — hand-set weights,
or a learned search's starting coefficients — and an expert whose weight is 0 keeps nothing, as in mergekit.

Differences from mergekit, none of which changes a definition:

- equal magnitudes at the trim threshold are kept in index order (mergekit's unstable ``argsort`` keeps any);
- the DARE mask comes from the ``generator`` passed in (the caller seeds one per tensor), so a tensor's mask is
  the same in every process; mergekit draws ``torch.bernoulli`` from the global RNG, unseeded or seeded once per
  run by ``--random-seed`` (a mask then depends on the order tensors are processed), so DARE matches mergekit
  in distribution only;
- DARE rescales by 1/density, the DARE paper's rule; mergekit 0.1.5's default ``rescale: true`` multiplies by
  ‖τ‖₁ / ‖dropped τ‖₁ instead, which is ≈ 1/density on large tensors but not equal draw by draw.

Magnitudes are ranked in float32, as mergekit does on CPU; the rest runs in float32 (float64 stays float64).
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch

COMBINE_METHODS = ("task-arithmetic", "ties", "dare", "dare-ties")
_TRIM = {"ties"}
_ELECT = {"ties", "dare-ties"}
#: Elements handled at a time, so that beyond the float32 working copy memory stays O(K · _CHUNK).
_CHUNK = 1 << 20
_BINS = 1 << 16


def process_deltas(
    deltas: torch.Tensor,
    method: str,
    density: float = 1.0,
    weights: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """The processed task vectors τ̂[K, ...] of one tensor's deltas[K, ...], in the deltas' dtype.

    ``density`` (in (0, 1]) is the kept fraction for TIES and DARE; ``weights[K]`` (required by ``ties`` and
    ``dare-ties``) are the merge weights the sign election uses; ``generator`` (on the deltas' device; ``None``
    uses torch's global RNG) draws the DARE mask. ``task-arithmetic`` returns ``deltas`` itself. With
    ``inplace=True`` a contiguous float32/float64 ``deltas`` is overwritten and returned; always use the result.
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if deltas.dim() < 1 or deltas.shape[0] < 1:
        raise ValueError(f"deltas must be [K, ...] with K >= 1, got shape {tuple(deltas.shape)}")
    if not deltas.is_floating_point():
        raise ValueError(f"deltas must be a floating-point tensor, got {deltas.dtype}")
    k_experts = deltas.shape[0]
    if method in _ELECT:
        if weights is None:
            raise ValueError(f"method {method!r} needs weights[K] for its sign election")
        if weights.shape != (k_experts,):
            raise ValueError(f"weights must have shape ({k_experts},), got {tuple(weights.shape)}")
    if method == "task-arithmetic" or (density >= 1 and method not in _ELECT):
        return deltas

    work_dtype = torch.float64 if deltas.dtype == torch.float64 else torch.float32
    if inplace and deltas.dtype == work_dtype and deltas.is_contiguous():
        work = deltas
    else:
        work = deltas.to(work_dtype, memory_format=torch.contiguous_format, copy=True)
    flat = work.view(k_experts, -1)
    if density < 1:
        for row in flat:
            if method in _TRIM:
                _trim_(row, density)
            else:
                _drop_(row, density, generator)
    if method in _ELECT:
        _elect_(flat, weights.to(device=work.device, dtype=work_dtype))
    return work if work.dtype == deltas.dtype else work.to(deltas.dtype)


def topk_count(numel: int, density: float) -> int:
    """How many entries the TIES trim keeps: mergekit's ``max(1, int(density * numel))``, all when density ≥ 1."""
    if density >= 1:
        return numel
    return min(numel, max(1, int(density * numel)))


def _trim_(row: torch.Tensor, density: float) -> None:
    """Zero all but the ``topk_count`` largest |row| in place; ties at the threshold are kept in index order."""
    keep = topk_count(row.numel(), density)
    if keep >= row.numel():
        return
    threshold, above = _kth_largest_abs(row, keep)
    ties_left = keep - above
    for chunk in row.split(_CHUNK):
        magnitude = chunk.abs().float()
        drop = magnitude < threshold
        tied = (magnitude == threshold).nonzero().squeeze(1)
        drop[tied[ties_left:]] = True
        ties_left -= min(ties_left, tied.numel())
        chunk.masked_fill_(drop, 0)


def _kth_largest_abs(row: torch.Tensor, k: int) -> tuple[float, int]:
    """The k-th largest |row| (ranked in float32) and how many entries exceed it.

    A two-pass radix select on the float32 bit pattern, which orders like the value for non-negative floats:
    a histogram of the high 16 bits finds the bucket, one of the low 16 bits within it the exact value. Unlike
    ``kthvalue`` or ``argsort`` it needs no full-size copy or int64 index tensor.
    """
    high = torch.zeros(_BINS, dtype=torch.int64, device=row.device)
    for chunk in row.split(_CHUNK):
        high += torch.bincount(_bits(chunk) >> 16, minlength=_BINS)
    bucket, above = _locate(high, k)
    low = torch.zeros(_BINS, dtype=torch.int64, device=row.device)
    for chunk in row.split(_CHUNK):
        bits = _bits(chunk)
        low += torch.bincount(bits[(bits >> 16) == bucket] & (_BINS - 1), minlength=_BINS)
    value, above_low = _locate(low, k - above)
    pattern = torch.tensor([(bucket << 16) | value], dtype=torch.int32)
    return float(pattern.view(torch.float32)), above + above_low


def _bits(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.abs().float().view(torch.int32)


def _locate(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (k ≥ 1) and the count of entries in higher bins."""
    from_top = histogram.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([k], device=from_top.device)))
    above = int(from_top[index - 1]) if index > 0 else 0
    return histogram.numel() - 1 - index, above


def _drop_(row: torch.Tensor, density: float, generator: Optional[torch.Generator]) -> None:
    """DARE in place: keep each entry with probability ``density`` and divide the kept ones by it.

    The mask comes from ``generator``, chunk by chunk, so a generator seeded per tensor gives the same mask in
    every process on the same device type. mergekit instead draws ``torch.bernoulli`` from the global RNG, which
    is unseeded (or seeded once per run), so its masks match ours in distribution only.
    """
    for chunk in row.split(_CHUNK):
        draw = torch.rand(chunk.shape, generator=generator, device=chunk.device, dtype=torch.float32)
        chunk.masked_fill_(draw >= density, 0).div_(density)


def _elect_(flat: torch.Tensor, weights: torch.Tensor) -> None:
    """TIES sign election in place: elect sign(Σ_k w_k τ_k) (0 elects +), keep τ_k where sign(w_k τ_k) equals it."""
    for start in range(0, flat.shape[1], _CHUNK):
        block = flat[:, start : start + _CHUNK]
        weighted = block * weights.unsqueeze(1)
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(block.dtype)
        # sign(w_k τ_k) == elected ⟺ w_k τ_k · elected > 0 (exact: elected is ±1).
        block.masked_fill_(weighted.mul_(elected) <= 0, 0)


def tensor_task_vectors(name: str, experts: torch.Tensor, base: torch.Tensor, method: str, density: float,
                        weights: Sequence[float], seed: int) -> torch.Tensor:
    """τ̂[K, ...] of the tensor called ``name`` from the experts' values ``experts[K, ...]`` and the base's, in
    float32 on the CPU, with the DARE mask drawn from a generator seeded by (``seed``, ``name``): a merge on any
    device and `hf-glue blend` (streaming, tensor by tensor) process every tensor identically."""
    deltas = experts.detach().to("cpu", torch.float32, copy=True).sub_(base.detach().to("cpu", torch.float32))
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    return process_deltas(deltas, method, density, torch.tensor(list(weights), dtype=torch.float32), generator,
                          inplace=True)
