"""The blending engine: K experts as one K×N matrix per dtype, so θ(α) for M coefficient sets is one product.

Both perturbed models of an SPSA step come from a single ``[α₊; α₋] @ E`` per (dtype, group) segment, so
every expert byte is read once per step; model parameters are views into the product's output, one buffer
per segment sized for the largest M seen (an M = 1 blend is its first row). α and the accumulation are always
float32 (half-precision experts are converted in cache-sized float32 chunks). The blends the search and the
held-out evaluation run are in `search_dtype`: float32 for half-precision experts, because a perturbation c·Δ of
task vectors 0.1–1 % of |θ| is below bfloat16's resolution — rounded to the experts' dtype, θ+ and θ− would be
equal on most elements. Only `materialize` (the saved model) rounds θ(α) once to the experts' dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from ..io.experts import Expert

#: Columns converted to float32 at a time for half-precision experts: on CPU the K×chunk copy stays in cache,
#: so the product moves little more than the floor's bytes; on CUDA it only bounds the temporary copy.
CPU_CHUNK = 1 << 15
CUDA_CHUNK = 1 << 20
_FULL = (torch.float32, torch.float64)


def search_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the blends the search runs for experts held in ``dtype``: float32 for half precision (so the
    two perturbed blends differ as intended), else ``dtype`` itself."""
    return dtype if dtype in _FULL else torch.float32
_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.")


def group_of(name: str, granularity: str) -> str:
    """The coefficient group of a parameter: one for the model, one per numbered block, one per module type (the
    name inside its block, e.g. ``attention.self.query``, shared by every block), or one per tensor."""
    if granularity == "model":
        return "model"
    if granularity == "tensor":
        return name
    match = _LAYER_INDEX.match(name)
    if match:
        if granularity == "module":
            return name[match.end():].rsplit(".", 1)[0]
        return match.group(1)
    if any(tag in name for tag in ("embed", "wte", "wpe", "patch")):
        return "embeddings"
    return "head"


_BLOCK_NAME = re.compile(r"^(.*\.)?\d+$")


def layer_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's outermost numbered modules (transformer layers, ResNet stages), the blocks `group_of` names:
    on-the-fly blending forms one at a time and FSDP gathers one at a time. Everything else (embeddings, heads,
    final norms) belongs to the root."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():  # pre-order: a block before its children
        if _BLOCK_NAME.match(name) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return found


def checkpoint_names(model: torch.nn.Module, names, buffers: bool = False) -> dict[int, str]:
    """Each of the model's parameters (and buffers) → the name its checkpoint stores it under: its own, or for a tied
    tensor the first of its names that ``names`` holds."""
    found: dict[int, str] = {}
    tensors = [*model.named_parameters(remove_duplicate=False)]
    if buffers:
        tensors += [*model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if name in names:
            found.setdefault(id(tensor), name)
    return found


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


class _Blend(torch.autograd.Function):
    """``a[M, K] @ e[K, n]`` returned as one output per (row, tensor); the gradient is w.r.t. ``a`` only.

    Backward reads ``e`` (the expert matrix itself, saved without a copy) once more, converting half-precision
    chunks to float32 again instead of keeping float32 copies of every chunk for autograd, and consumes each
    parameter's gradient as is (no concatenation into one N-sized gradient).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, e: torch.Tensor, sizes: list[int], dtype: torch.dtype):
        out = torch.empty(a.shape[0], e.shape[1], dtype=dtype, device=e.device)
        exact_product(a, e, out)
        ctx.save_for_backward(e)
        ctx.sizes, ctx.a_dtype = sizes, a.dtype
        ctx.set_materialize_grads(False)  # unused parameters: no zero-filled gradient
        return tuple(part for row in out for part in row.split(sizes))

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        (e,) = ctx.saved_tensors
        sizes = ctx.sizes
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        grad = torch.zeros(len(grads) // len(sizes), e.shape[0], dtype=torch.float32, device=e.device)
        for j, g in enumerate(grads):
            if g is not None:
                row, t = divmod(j, len(sizes))
                grad[row] += _matvec(e[:, offsets[t]: offsets[t] + sizes[t]], g.reshape(-1))
        return grad.to(ctx.a_dtype), None, None, None


def _matvec(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``e[K, n] @ g[n]`` accumulated in float32 at least (half inputs in float32 chunks)."""
    if e.dtype in _FULL:
        return torch.mv(e, g.to(e.dtype)).float()
    chunk = CUDA_CHUNK if e.device.type == "cuda" else CPU_CHUNK
    out = torch.zeros(e.shape[0], dtype=torch.float32, device=e.device)
    for lo in range(0, e.shape[1], chunk):
        out += torch.mv(e[:, lo: lo + chunk].float(), g[lo: lo + chunk].float())
    return out


class CoefficientLayout:
    """What methods and results see of a blending engine: K named experts, G coefficient groups and their sizes
    (shared by `ExpertMatrix` and the LoRA `AdapterMatrix`)."""

    expert_names: list[str]
    groups: list[str]
    _device: torch.device
    _group_sizes: torch.Tensor

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype a model holding the blend uses: the experts' one float dtype, float32 when they mix several."""
        dtypes = {s.dtype for s in self.slots.values()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def search_dtype(self) -> torch.dtype:
        """The dtype of the template the search runs (float32 for half-precision experts, see `search_dtype`)."""
        return search_dtype(self.model_dtype)

    def _count_groups(self, slots) -> None:
        """Group sizes from ``slots`` (whole tensors: a sharded engine counts the model's, not its shards)."""
        self._group_sizes = torch.zeros(len(self.groups), dtype=torch.float64)
        for slot in slots:
            self._group_sizes[slot.group] += slot.numel

    def group_sizes(self) -> torch.Tensor:
        """Number of blended elements per group (weights the per-expert summary of per-group α)."""
        return self._group_sizes

    def models(self, alphas: torch.Tensor, *, rounded: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """For each coefficient set in ``alphas[M, G, K]``, what `Objective` passes to the template model (by
        `functional_call`) to run θ(α): here its blended tensors; engines that form θ(α) inside the model
        (on the fly, sharded) install it before yielding and yield only what is left to pass. ``rounded``: the
        weights the saved model holds (rounded once to the experts' dtype), for scoring a candidate answer; else
        the search's exact blends."""
        yield from self.blend(alphas, rounded=rounded)

    def _with_offset(self, alphas: torch.Tensor) -> torch.Tensor:
        """``alphas[..., K]`` with the base's coefficient 1 appended for task vectors (unchanged otherwise)."""
        if not self.offset:
            return alphas
        return torch.cat([alphas, alphas.new_ones(*alphas.shape[:-1], 1)], -1)

    def summarize(self, alpha: torch.Tensor) -> dict[str, float]:
        """Per-expert coefficients: α itself for one group, else the size-weighted mean over groups."""
        alpha = alpha.detach().double().cpu().reshape(self.num_groups, self.num_experts)
        weights = self.group_sizes()
        mean = (weights[:, None] * alpha).sum(0) / weights.sum()
        return {name: float(v) for name, v in zip(self.expert_names, mean)}

    def by_group(self, alpha: torch.Tensor) -> dict[str, dict[str, float]]:
        alpha = alpha.detach().double().cpu().reshape(self.num_groups, self.num_experts)
        return {g: {n: float(v) for n, v in zip(self.expert_names, row)} for g, row in zip(self.groups, alpha)}


class ExpertMatrix(CoefficientLayout):
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
        self._device = next(iter(buffers.values())).device
        # per dtype, per group: its slots in column order (contiguous: slots are laid out group by group);
        # one product per segment, split into the segment's parameters
        self.segments: dict[torch.dtype, dict[int, list[Slot]]] = {dt: {} for dt in buffers}
        for slot in sorted(slots.values(), key=lambda sl: sl.offset):
            self.segments[slot.dtype].setdefault(slot.group, []).append(slot)
        self._count_groups(slots.values())
        # the no-grad products: one buffer per (dtype, group) segment with room for ``_rows`` models, and the
        # name → view dict of every row, built once per allocation
        self._outputs: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        self._views: list[dict[str, torch.Tensor]] = []
        #: task vectors: the matrix has one more row, the base, whose coefficient is always 1
        self.offset = False
        #: task vectors: how they were processed (method, density, election weights, seed), for the result
        self.task_vectors: Optional[dict] = None
        #: blend in the stored dtype instead of `search_dtype` (the heads of adapters over a half-precision base)
        self.keep_dtype = False

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.keep_dtype else search_dtype(dtype)

    def expert_bytes(self) -> int:
        """Bytes of the expert rows this process holds (all of them, or its shards)."""
        return sum(b.nbytes for b in self.buffers.values())

    def product_bytes(self) -> int:
        """Bytes held by the no-grad product buffers (released by `release`)."""
        return sum(out.nbytes for out in self._outputs.values())

    @classmethod
    def from_experts(
        cls,
        experts: Sequence[Expert],
        granularity: str = "model",
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str = "cpu",
        rows: Optional[dict[str, tuple[int, int]]] = None,
    ) -> "ExpertMatrix":
        """Stream every expert's tensors into the matrices; non-float tensors are taken from the first expert.
        ``rows``: hold only rows ``[start, stop)`` (dim 0) of the tensors it names (a process's shards)."""
        group_names, slots = layout_slots(experts[0], granularity, dtype, rows)
        sizes: dict[torch.dtype, int] = {}
        for slot in slots.values():
            sizes[slot.dtype] = max(sizes.get(slot.dtype, 0), slot.offset + slot.numel)
        buffers = {dt: torch.empty(len(experts), n, dtype=dt, device=device) for dt, n in sizes.items()}
        constants: dict[str, torch.Tensor] = {}
        for k, expert in enumerate(experts):
            # the first expert is read once for both its floats and the non-float tensors kept as they are
            for name, tensor in expert.iter_tensors(None if k == 0 else set(slots), rows):
                slot = slots.get(name)
                if slot is None:
                    constants[name] = tensor.to(device)
                else:
                    buffers[slot.dtype][k, slot.offset: slot.offset + slot.numel].copy_(tensor.reshape(-1))
        return cls([e.name for e in experts], group_names, slots, buffers, constants)

    @classmethod
    def from_task_vectors(
        cls,
        experts: Sequence[Expert],
        base: Expert,
        method: str,
        *,
        density: float,
        weights: Sequence[float],
        seed: int,
        granularity: str = "model",
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str = "cpu",
    ) -> "ExpertMatrix":
        """θ(λ) = θ_base + Σ_k λ_k τ̂_k as one product: rows 0…K−1 hold the experts' processed task vectors
        τ̂_k (`task_vectors.process_deltas` of θ_k − θ_base: ``method``, ``density``, sign election with
        ``weights``), row K the base, whose coefficient is always 1 (added by `blend` and `materialize`). A DARE
        mask is drawn from a generator seeded by (``seed``, tensor name): the same on every process."""
        from .task_vectors import tensor_task_vectors

        matrix = cls.from_experts([*experts, base], granularity, dtype=dtype, device=device)
        k = len(experts)
        for slot in matrix.slots.values():
            cols = matrix.buffers[slot.dtype][:, slot.offset: slot.offset + slot.numel]
            tau = tensor_task_vectors(slot.name, cols[:k].view(k, *slot.shape), cols[k].view(slot.shape), method,
                                      density, weights, seed)
            cols[:k].copy_(tau.reshape(k, -1))
        matrix.expert_names = [e.name for e in experts]
        matrix.offset = True
        matrix.task_vectors = {"method": method, "density": density, "election_weights": [float(w) for w in weights],
                               "seed": seed}
        return matrix

    @classmethod
    def from_rows(cls, expert_names: Sequence[str], rows: Sequence[dict[str, torch.Tensor]], groups: Sequence[str],
                  group_index: dict[str, int], device: torch.device | str = "cpu") -> "ExpertMatrix":
        """A matrix of in-memory tensors (one name → tensor dict per expert, same names and shapes in each), with
        the groups given by the caller (e.g. the whole tensors that adapters save, grouped like their factors)."""
        names = sorted(rows[0], key=lambda n: group_index[n])
        sizes: dict[torch.dtype, int] = {}
        slots: dict[str, Slot] = {}
        for name in names:
            t = rows[0][name]
            slots[name] = Slot(name, t.dtype, group_index[name], sizes.get(t.dtype, 0), tuple(t.shape))
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        buffers = {dt: torch.empty(len(rows), n, dtype=dt, device=device) for dt, n in sizes.items()}
        for k, row in enumerate(rows):
            for name, slot in slots.items():
                buffers[slot.dtype][k, slot.offset: slot.offset + slot.numel].copy_(row[name].reshape(-1))
        return cls(expert_names, groups, slots, buffers, {})

    def blend(self, alphas: torch.Tensor, *, rounded: bool = False) -> list[dict[str, torch.Tensor]]:
        """θ for each of M coefficient sets ``alphas[M, G, K]``: one product per (dtype, group) segment.

        Returns M name → tensor dicts whose tensors are views of the products (no copy), plus the non-float
        constants. With grad enabled the result is differentiable in ``alphas``; without, the products go
        into buffers reused by the next call (no allocation, no page faults per step) and the dicts are
        cached too: both are valid until the next call and must not be modified. The blends are in
        `search_dtype` (float32 for half-precision experts), with α and the accumulation in float32; ``rounded``:
        rounded to the experts' dtype (and held in the search's), the saved model's weights.
        """
        if not self.buffers:
            raise RuntimeError("the expert matrix was released: nothing left to blend.")
        if alphas.dim() == 2:
            alphas = alphas.unsqueeze(0)
        alphas = self._with_offset(alphas.to(self.device))  # differentiable: the gradient flows back to alphas
        m = alphas.shape[0]
        if torch.is_grad_enabled() and alphas.requires_grad:
            views: list[dict[str, torch.Tensor]] = [dict(self.constants) for _ in range(m)]
            for (dtype, g), slots, e in self._segment_inputs():
                parts = _Blend.apply(alphas[:, g, :], e, [s.numel for s in slots], self._out_dtype(dtype))
                for j, part in enumerate(parts):
                    row, slot = divmod(j, len(slots))
                    views[row][slots[slot].name] = part.view(slots[slot].shape)
            return views
        self._reserve(m)
        with torch.no_grad():
            for key, _, e in self._segment_inputs():
                out = self._outputs[key][:m]
                exact_product(alphas[:, key[1], :], e, out)
                if rounded and out.dtype != e.dtype:
                    round_to(out, e.dtype)
        return self._views[:m]

    def materialize(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact θ(α) for one ``alpha[G, K]`` as standalone tensors (one allocation each, not views of a shared
        buffer), which a model can own and save; it needs no memory beyond the result."""
        alpha = self._with_offset(alpha.reshape(self.num_groups, self.num_experts).to(self.device, torch.float32))
        out = dict(self.constants)
        with torch.no_grad():
            for slot in self.slots.values():
                e = self.buffers[slot.dtype][:, slot.offset: slot.offset + slot.numel]
                tensor = torch.empty(1, slot.numel, dtype=slot.dtype, device=self.device)
                exact_product(alpha[slot.group: slot.group + 1], e, tensor)
                out[slot.name] = tensor.view(slot.shape)
        return out


    def release(self, experts: bool = False) -> None:
        """Free the product buffers (the next no-grad blend allocates them again); with ``experts`` also the
        expert matrix, when nothing will blend any more (before the final model is saved or fine-tuned)."""
        self._outputs, self._views = {}, []
        if experts:
            self.buffers = {}

    def _segment_inputs(self):
        """``((dtype, group), slots, e)`` for every segment: its slots and its columns of the expert matrix."""
        for dtype, groups in self.segments.items():
            for g, slots in groups.items():
                lo, hi = slots[0].offset, slots[-1].offset + slots[-1].numel
                yield (dtype, g), slots, self.buffers[dtype][:, lo:hi]

    def _reserve(self, m: int) -> None:
        """Product buffers (and their views) with room for ``m`` models; smaller ones are freed first."""
        if m <= len(self._views):
            return
        self.release()
        self._views = [dict(self.constants) for _ in range(m)]
        for key, slots, e in self._segment_inputs():
            out = self._outputs[key] = torch.empty(m, e.shape[1], dtype=self._out_dtype(e.dtype), device=e.device)
            # unbind/split (not slicing): cheap views, one per parameter
            for i, row in enumerate(out.unbind(0)):
                for slot, part in zip(slots, row.split([s.numel for s in slots])):
                    self._views[i][slot.name] = part.view(slot.shape)


def round_to(t: torch.Tensor, dtype: torch.dtype, chunk: int = CUDA_CHUNK) -> None:
    """Round ``t`` in place to the values ``dtype`` holds (chunk by chunk: no full-size temporary)."""
    flat = t.view(-1)
    for lo in range(0, flat.numel(), chunk):
        part = flat[lo: lo + chunk]
        part.copy_(part.to(dtype))


def exact_product(a: torch.Tensor, e: torch.Tensor, out: torch.Tensor) -> None:
    """``out[M, n] = a[M, K] @ e[K, n]`` with α and the accumulation in float32 at least, rounded once to ``out``'s
    dtype (none when it is float32)."""
    if e.dtype in _FULL:
        torch.mm(a.to(e.dtype), e, out=out)
        return
    a32 = a.to(torch.float32)
    chunk = max(1, min(CUDA_CHUNK if e.device.type == "cuda" else CPU_CHUNK, e.shape[1]))
    e32 = torch.empty(e.shape[0] * chunk, dtype=torch.float32, device=e.device)  # reused by every chunk
    o32 = torch.empty(a.shape[0] * chunk, dtype=torch.float32, device=e.device)
    for lo in range(0, e.shape[1], chunk):
        width = min(chunk, e.shape[1] - lo)
        part = e32[: e.shape[0] * width].view(e.shape[0], width)
        part.copy_(e[:, lo: lo + width])
        prod = o32[: a.shape[0] * width].view(a.shape[0], width)
        torch.mm(a32, part, out=prod)
        out[:, lo: lo + width].copy_(prod)


def layout_slots(expert: Expert, granularity: str, dtype: Optional[torch.dtype] = None,
                 rows: Optional[dict[str, tuple[int, int]]] = None) -> tuple[list[str], dict[str, Slot]]:
    """The coefficient groups and the slot of every floating tensor of ``expert``'s checkpoint: one buffer per
    dtype (``dtype`` overrides the stored one), laid out group by group, in checkpoint order within a group;
    ``rows`` narrows the tensors it names to rows ``[start, stop)``."""
    rows = rows or {}
    float_groups = {i.name: group_of(i.name, granularity)
                    for i in expert.tensors.values() if i.dtype.is_floating_point}
    group_names = _order_groups(list(dict.fromkeys(float_groups.values())))
    group_index = {g: i for i, g in enumerate(group_names)}
    sizes: dict[torch.dtype, int] = {}
    slots: dict[str, Slot] = {}
    for name in sorted(float_groups, key=lambda n: group_index[float_groups[n]]):
        info = expert.tensors[name]
        work = dtype or info.dtype
        shape = (rows[name][1] - rows[name][0], *info.shape[1:]) if name in rows else info.shape
        slots[name] = Slot(name, work, group_index[float_groups[name]], sizes.get(work, 0), shape)
        sizes[work] = sizes.get(work, 0) + math.prod(shape)
    return group_names, slots


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
