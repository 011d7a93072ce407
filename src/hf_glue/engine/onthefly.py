"""On-the-fly blending: θ(α) is never whole. Each module's own tensors are formed from the K experts just
before it runs (a forward pre-hook) and dropped when it returns, so a step holds the experts, one module's
blend and the activations instead of 2q whole blended models.

The experts' rows come from a store: an `ExpertMatrix` on the device, or in CPU memory (``offload cpu``: pinned
where the device is a GPU, copied over a module at a time), or a `FileStore` that reads them from the experts'
safetensors files (``offload disk``) each time a module runs.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from ..errors import GlueError
from ..io.experts import Expert
from ..io.safetensors import SafetensorsReader
from .matrix import _FULL, CoefficientLayout, ExpertMatrix, Slot, exact_product, layout_slots


class FileStore:
    """The experts' rows read from their safetensors files when asked (nothing held but open file handles)."""

    def __init__(self, experts: Sequence[Expert], granularity: str, dtype: Optional[torch.dtype]) -> None:
        for expert in experts:
            if expert.loader is not None or any(i.file.suffix != ".safetensors" for i in expert.tensors.values()):
                raise GlueError(f"expert {expert.name!r}: --offload disk streams tensors from safetensors files, "
                                "and this one is pickled or read through transformers; use --offload cpu.")
        self.experts = list(experts)
        self.expert_names = [e.name for e in experts]
        self.groups, self.slots = layout_slots(experts[0], granularity, dtype)
        self.constants: dict[str, torch.Tensor] = {}
        # one pass over every expert before the search: refuses NaN/inf weights as the in-memory engines do, and
        # keeps the first expert's non-float tensors (position ids and the like)
        for k, expert in enumerate(experts):
            for name, tensor in expert.iter_tensors():
                if name not in self.slots and k == 0:
                    self.constants[name] = tensor
        self._readers: dict = {}
        self.offset = False

    def rows(self, slot: Slot, device: torch.device) -> torch.Tensor:
        """``[K, numel]`` of one tensor, on ``device``."""
        out = torch.empty(len(self.experts), slot.numel, dtype=slot.dtype, device=device)
        for k, expert in enumerate(self.experts):
            info = expert.tensors[slot.name]
            reader = self._readers.get(info.file)
            if reader is None:
                reader = self._readers[info.file] = SafetensorsReader(info.file)
            out[k].copy_(reader.read(slot.name).reshape(-1))
        return out

    def nbytes(self) -> int:
        return 0

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


class OnTheFlyMatrix(CoefficientLayout):
    """Blends each module's tensors inside the template's forward, for one coefficient set at a time."""

    lockstep = False

    def __init__(self, store: ExpertMatrix | FileStore, model: torch.nn.Module, device: torch.device) -> None:
        self.store = store
        self.model = model
        self.expert_names = list(store.expert_names)
        self.groups = list(store.groups)
        self.slots: dict[str, Slot] = store.slots
        self.constants = {k: v.to(device) for k, v in store.constants.items()}
        self._device = torch.device(device)
        self._group_sizes = torch.zeros(len(self.groups), dtype=torch.float64)
        for slot in self.slots.values():
            self._group_sizes[slot.group] += slot.numel
        self.offset = store.offset
        self.task_vectors = getattr(store, "task_vectors", None)
        self.half_mm = self._device.type == "cuda"
        self._alpha: Optional[torch.Tensor] = None
        self._exact = False
        self._handles: list = []

    @property
    def model_dtype(self) -> torch.dtype:
        dtypes = {s.dtype for s in self.slots.values()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def expert_bytes(self) -> int:
        """Bytes of expert rows held in memory (on the device, or in CPU memory when offloaded; none for disk)."""
        return self.store.expert_bytes() if isinstance(self.store, ExpertMatrix) else 0

    def product_bytes(self) -> int:
        return 0

    def models(self, alphas: torch.Tensor, *, exact: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Arms the hooks with each coefficient set in turn; the caller runs the template while it is armed."""
        if not self._handles:
            self._install()
        alphas = alphas.unsqueeze(0) if alphas.dim() == 2 else alphas
        if self.offset:  # task vectors: the base's coefficient 1
            alphas = torch.cat([alphas, alphas.new_ones(*alphas.shape[:-1], 1)], -1)
        try:
            for alpha in alphas.to(self._device, torch.float32):
                self._alpha, self._exact = alpha, exact
                yield self.constants
        finally:
            self._alpha = None

    def blend_slot(self, slot: Slot, alpha: torch.Tensor, exact: bool, device: Optional[torch.device] = None
                   ) -> torch.Tensor:
        """One tensor of θ(α), formed from its K rows."""
        rows = self._rows(slot)
        out = torch.empty(1, slot.numel, dtype=slot.dtype, device=self._device)
        if not exact and self.half_mm and slot.dtype not in _FULL:
            torch.mm(alpha[slot.group: slot.group + 1].to(slot.dtype), rows, out=out)
        else:
            exact_product(alpha[slot.group: slot.group + 1], rows, out)
        return out.view(slot.shape).to(device or self._device)

    def materialize(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact θ(α) as standalone tensors in CPU memory (the device may hold the experts and nothing more)."""
        alpha = alpha.reshape(self.num_groups, self.num_experts).to(self._device, torch.float32)
        if self.offset:
            alpha = torch.cat([alpha, alpha.new_ones(alpha.shape[0], 1)], -1)
        cpu = torch.device("cpu")
        out = {k: v.to(cpu) for k, v in self.constants.items()}
        with torch.no_grad():
            for slot in self.slots.values():
                out[slot.name] = self.blend_slot(slot, alpha, exact=True, device=cpu)
        return out

    def release(self, experts: bool = False) -> None:
        """Remove the hooks (the next `models` call puts them back); with ``experts`` also drop the experts."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if experts:
            if isinstance(self.store, FileStore):
                self.store.close()
            else:
                self.store.release(experts=True)

    def _rows(self, slot: Slot) -> torch.Tensor:
        if isinstance(self.store, FileStore):
            return self.store.rows(slot, self._device)
        buffer = self.store.buffers[slot.dtype]
        rows = buffer[:, slot.offset: slot.offset + slot.numel]
        if buffer.device == self._device:
            return rows
        out = torch.empty(rows.shape, dtype=rows.dtype, device=self._device)
        for k in range(rows.shape[0]):  # one contiguous (pinned) row at a time: asynchronous copies
            out[k].copy_(buffer[k, slot.offset: slot.offset + slot.numel], non_blocking=True)
        return out

    def _install(self) -> None:
        """A pre-hook and a post-hook on every module owning blended tensors (its own, not its children's). Tied
        tensors are blended from the checkpoint's one copy, by whichever module runs."""
        canonical: dict[int, str] = {}
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False),
                             *self.model.named_buffers(remove_duplicate=False)]:
            if name in self.slots:
                canonical.setdefault(id(tensor), name)
        for name, tensor in self.model.named_parameters(remove_duplicate=False):
            if id(tensor) not in canonical:
                raise GlueError(f"parameter {name!r} has no tensor in the experts' checkpoints.")
        for module in self.model.modules():
            own = [(store, key, self.slots[canonical[id(t)]])
                   for store in ("_parameters", "_buffers")
                   for key, t in getattr(module, store).items() if t is not None and id(t) in canonical]
            if own:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(own)))
                originals = [(store, key, getattr(module, store)[key]) for store, key, _ in own]
                self._handles.append(module.register_forward_hook(_restore(originals), always_call=True))

    def _pre_hook(self, own: list[tuple[str, str, Slot]]):
        def hook(module, args):
            if self._alpha is None:
                raise RuntimeError("on-the-fly template run outside OnTheFlyMatrix.models()")
            with torch.no_grad():
                for store, key, slot in own:
                    getattr(module, store)[key] = self.blend_slot(slot, self._alpha, self._exact)

        return hook


def _restore(originals: list[tuple[str, str, torch.Tensor]]):
    """A post-hook putting a module's template tensors (meta parameters, buffers) back: its blend is freed."""

    def hook(module, args, output):
        for store, key, tensor in originals:
            getattr(module, store)[key] = tensor

    return hook
