"""The blending engine: K experts as one K×N matrix per dtype, so θ(α) for M coefficient sets is one product.

Both perturbed models of an SPSA step come from a single ``[α₊; α₋] @ E`` per (dtype, group) segment, so
every expert byte is read once per step; model parameters are views into the product's output. Half-precision
experts are multiplied in float32 chunks and rounded once (float32 accumulation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..io.experts import Expert

#: Columns converted to float32 at a time for half-precision experts (bounds the temporary K×chunk copy).
HALF_CHUNK = 1 << 22
_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.")


def group_of(name: str, granularity: str) -> str:
    """The coefficient group of a parameter: one for the model, one per numbered block, or one per tensor."""
    if granularity == "model":
        return "model"
    if granularity == "tensor":
        return name
    match = _LAYER_INDEX.match(name)
    if match:
        return match.group(1)
    if any(tag in name for tag in ("embed", "wte", "wpe", "patch")):
        return "embeddings"
    return "head"


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives: its dtype buffer, group and column range."""

    name: str
    dtype: torch.dtype
    group: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ExpertMatrix:
    """The experts' floating tensors, stacked as one ``K × N`` matrix per dtype, ready to blend."""

    def __init__(
        self,
        expert_names: Sequence[str],
        groups: Sequence[str],
        slots: dict[str, Slot],
        buffers: dict[torch.dtype, torch.Tensor],
        constants: dict[str, torch.Tensor],
    ) -> None:
        self.expert_names = list(expert_names)
        self.groups = list(groups)
        self.slots = slots
        self.buffers = buffers
        self.constants = constants
        # per dtype, per group: its slots in column order (contiguous: slots are laid out group by group);
        # one product per segment, split into the segment's parameters
        self.segments: dict[torch.dtype, dict[int, list[Slot]]] = {dt: {} for dt in buffers}
        for slot in sorted(slots.values(), key=lambda sl: sl.offset):
            self.segments[slot.dtype].setdefault(slot.group, []).append(slot)
        self._group_sizes = torch.zeros(len(self.groups), dtype=torch.float64)
        for slot in slots.values():
            self._group_sizes[slot.group] += slot.numel
        self._outputs: dict[tuple, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    def group_sizes(self) -> torch.Tensor:
        """Number of blended elements per group (weights the per-expert summary of per-group α)."""
        return self._group_sizes

    @classmethod
    def from_experts(
        cls,
        experts: Sequence[Expert],
        granularity: str = "model",
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str = "cpu",
    ) -> "ExpertMatrix":
        """Stream every expert's tensors into the matrices; non-float tensors are taken from the first expert."""
        float_groups = {i.name: group_of(i.name, granularity)
                        for i in experts[0].tensors.values() if i.dtype.is_floating_point}
        group_names = _order_groups(list(dict.fromkeys(float_groups.values())))
        group_index = {g: i for i, g in enumerate(group_names)}
        # lay out each dtype buffer group by group, tensors in checkpoint order within a group
        sizes: dict[torch.dtype, int] = {}
        slots: dict[str, Slot] = {}
        for name in sorted(float_groups, key=lambda n: group_index[float_groups[n]]):
            info = experts[0].tensors[name]
            work = dtype or info.dtype
            slots[name] = Slot(name, work, group_index[float_groups[name]], sizes.get(work, 0), info.shape)
            sizes[work] = sizes.get(work, 0) + info.numel
        buffers = {dt: torch.empty(len(experts), n, dtype=dt, device=device) for dt, n in sizes.items()}
        constants: dict[str, torch.Tensor] = {}
        for k, expert in enumerate(experts):
            # the first expert is read once for both its floats and the non-float tensors kept as they are
            for name, tensor in expert.iter_tensors(None if k == 0 else set(slots)):
                slot = slots.get(name)
                if slot is None:
                    constants[name] = tensor.to(device)
                else:
                    buffers[slot.dtype][k, slot.offset: slot.offset + slot.numel].copy_(tensor.reshape(-1))
        return cls([e.name for e in experts], group_names, slots, buffers, constants)

    def blend(self, alphas: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """θ for each of M coefficient sets ``alphas[M, G, K]``: one product per (dtype, group) segment.

        Returns M name → tensor dicts whose tensors are views of the products (no copy), plus the non-float
        constants. With grad enabled the result is differentiable in ``alphas``; without, the products go
        into buffers reused by the next call (no allocation, no page faults per step), so the views are
        valid until then.
        """
        if alphas.dim() == 2:
            alphas = alphas.unsqueeze(0)
        m = alphas.shape[0]
        reuse = not (torch.is_grad_enabled() and alphas.requires_grad)
        views: list[dict[str, torch.Tensor]] = [dict(self.constants) for _ in range(m)]
        for dtype, buffer in self.buffers.items():
            for g, slots in self.segments[dtype].items():
                lo, hi = slots[0].offset, slots[-1].offset + slots[-1].numel
                out = self._product(alphas[:, g, :], buffer[:, lo:hi], (dtype, g, m) if reuse else None)
                # unbind/split (not slicing): their backward is one concatenation, not one full-size
                # zero-filled gradient per parameter
                for i, row in enumerate(out.unbind(0)):
                    for slot, part in zip(slots, row.split([s.numel for s in slots])):
                        views[i][slot.name] = part.view(slot.shape)
        return views

    def _product(self, a: torch.Tensor, e: torch.Tensor, key) -> torch.Tensor:
        """``a[M, K] @ e[K, n]``, accumulated in float32 at least, in ``e``'s dtype (into a kept buffer if keyed)."""
        out = None
        if key is not None:
            out = self._outputs.get(key)
            if out is None:
                out = self._outputs[key] = torch.empty(a.shape[0], e.shape[1], dtype=e.dtype, device=e.device)
        if e.dtype in (torch.float32, torch.float64):
            a = a.to(e.dtype)
            return torch.mm(a, e, out=out) if out is not None else torch.mm(a, e)
        a32 = a.to(torch.float32)
        if out is None:
            out = torch.empty(a.shape[0], e.shape[1], dtype=e.dtype, device=e.device)
        for lo in range(0, e.shape[1], HALF_CHUNK):
            hi = min(lo + HALF_CHUNK, e.shape[1])
            out[:, lo:hi] = torch.mm(a32, e[:, lo:hi].to(torch.float32))
        return out

    def summarize(self, alpha: torch.Tensor) -> dict[str, float]:
        """Per-expert coefficients: α itself for one group, else the size-weighted mean over groups."""
        alpha = alpha.detach().double().cpu().reshape(self.num_groups, self.num_experts)
        weights = self.group_sizes()
        mean = (weights[:, None] * alpha).sum(0) / weights.sum()
        return {name: float(v) for name, v in zip(self.expert_names, mean)}

    def by_group(self, alpha: torch.Tensor) -> dict[str, dict[str, float]]:
        alpha = alpha.detach().double().cpu().reshape(self.num_groups, self.num_experts)
        return {g: {n: float(v) for n, v in zip(self.expert_names, row)} for g, row in zip(self.groups, alpha)}


def _order_groups(names: list[str]) -> list[str]:
    """embeddings first, numbered blocks in numeric order, the rest (heads) last."""

    def key(name: str):
        if name == "embeddings":
            return (0, [])
        match = _LAYER_INDEX.match(name + ".")
        if match:
            parts = [(int(p) if p.isdigit() else p) for p in name.split(".")]
            return (1, [(0, p) if isinstance(p, int) else (1, p) for p in parts])
        return (2, [])

    return sorted(names, key=key)
