"""On-the-fly blending: θ(α) is never whole. Each block's tensors (a transformer layer, a ResNet stage: the
`layer_blocks`) are formed from the K experts just before it runs (a forward pre-hook) and dropped when it
returns; the tensors outside blocks (embeddings, heads, final norms) are formed when the model starts and kept
until it returns, since models read them from several places. A step holds the experts, those tensors, one
block's blend and the activations instead of 2q whole blended models.

The experts' rows come from a store: an `ExpertMatrix` on the device, or in CPU memory (``offload cpu``: page-
locked where the device is a GPU, copied over a tensor at a time), or a `FileStore` that reads them from the
experts' safetensors files (``offload disk``) each time a block runs.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import torch

from ..errors import GlueError
from ..io.experts import Expert
from ..io.safetensors import SafetensorsReader
from .matrix import (CoefficientLayout, ExpertMatrix, Slot, checkpoint_names, exact_product, layer_blocks, layout_slots,
                     round_to, search_dtype)

logger = logging.getLogger(__name__)


class FileStore:
    """The experts' rows read from their safetensors files when asked (nothing held but open file handles)."""

    def __init__(self, experts: Sequence[Expert], granularity: str, dtype: Optional[torch.dtype]) -> None:
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

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


def pin_in_place(buffer: torch.Tensor) -> bool:
    """Page-lock a CPU tensor where it is (cudaHostRegister), so that copies of its rows to the GPU are
    asynchronous. Unlike ``pin_memory()``, nothing is copied and the size is not rounded up to a power of two
    (which would turn 54 GB of experts into 69 GB). Returns whether it worked; if not, copies are synchronous."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0)
    except (AttributeError, RuntimeError):
        return False
    ok = int(getattr(err, "value", err)) == 0
    if not ok:
        logger.warning("could not page-lock the offloaded experts (CUDA error %s): host → device copies are "
                       "synchronous", err)
    return ok


def unpin(buffer: torch.Tensor) -> None:
    """Undo `pin_in_place` before the tensor's memory is freed."""
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class OnTheFlyMatrix(CoefficientLayout):
    """Blends each block's tensors inside the template's forward, for one coefficient set at a time."""

    lockstep = False

    def __init__(self, store: ExpertMatrix | FileStore, model: torch.nn.Module, device: torch.device,
                 pin: bool = False) -> None:
        """``pin``: page-lock an in-memory store held in CPU memory for a GPU (``--offload cpu``)."""
        self.store = store
        self.model = model
        self.expert_names = list(store.expert_names)
        self.groups = list(store.groups)
        self.slots: dict[str, Slot] = store.slots
        self.constants = {k: v.to(device) for k, v in store.constants.items()}
        self._device = torch.device(device)
        self._count_groups(self.slots.values())
        self.offset = store.offset
        self.task_vectors = getattr(store, "task_vectors", None)
        self._alpha: Optional[torch.Tensor] = None
        self._rounded = False
        self._handles: list = []
        #: blends dropped by a finished block, reused by the next one (same shapes): no fresh pages per block
        self._spare: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        pinnable = pin and isinstance(store, ExpertMatrix)
        self._pinned = [b for b in store.buffers.values() if pin_in_place(b)] if pinnable else []

    def expert_bytes(self) -> int:
        """Bytes of expert rows held in memory (on the device, or in CPU memory when offloaded; none for disk)."""
        return self.store.expert_bytes() if isinstance(self.store, ExpertMatrix) else 0

    def product_bytes(self) -> int:
        return 0

    def models(self, alphas: torch.Tensor, *, rounded: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Arms the hooks with each coefficient set in turn; the caller runs the template while it is armed.
        ``rounded``: the saved model's weights (`ExpertMatrix.models`)."""
        if not self._handles:
            self._install()
        alphas = self._with_offset(alphas.unsqueeze(0) if alphas.dim() == 2 else alphas)
        try:
            for alpha in alphas.to(self._device, torch.float32):
                self._alpha, self._rounded = alpha, rounded
                yield self.constants
        finally:
            self._alpha = None

    def materialize(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact θ(α) as standalone tensors in CPU memory (the device may hold the experts and nothing more)."""
        alpha = self._with_offset(alpha.reshape(self.num_groups, self.num_experts).to(self._device, torch.float32))
        cpu = torch.device("cpu")
        out = {k: v.to(cpu) for k, v in self.constants.items()}
        with torch.no_grad():
            for slot in self.slots.values():
                out[slot.name] = self._blend(slot, alpha, slot.dtype).to(cpu)
        return out

    def release(self, experts: bool = False) -> None:
        """Remove the hooks (the next `models` call puts them back); with ``experts`` also drop the experts."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._spare = [], {}
        if experts:
            for buffer in self._pinned:
                unpin(buffer)
            self._pinned = []
            if isinstance(self.store, FileStore):
                self.store.close()
            else:
                self.store.release(experts=True)

    def _blend(self, slot: Slot, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One tensor of θ(α), formed from its K rows in ``dtype`` (the search's, or the experts' for saving)."""
        rows = self._rows(slot)
        spare = self._spare.get((dtype, slot.numel))
        out = spare.pop() if spare else torch.empty(1, slot.numel, dtype=dtype, device=self._device)
        exact_product(alpha[slot.group: slot.group + 1], rows, out)
        return out.view(slot.shape)

    def _rows(self, slot: Slot) -> torch.Tensor:
        if isinstance(self.store, FileStore):
            return self.store.rows(slot, self._device)
        buffer = self.store.buffers[slot.dtype]
        rows = buffer[:, slot.offset: slot.offset + slot.numel]
        if buffer.device == self._device:
            return rows
        out = torch.empty(rows.shape, dtype=rows.dtype, device=self._device)
        for k in range(rows.shape[0]):  # one contiguous (page-locked) row at a time: asynchronous copies
            out[k].copy_(buffer[k, slot.offset: slot.offset + slot.numel], non_blocking=True)
        return out

    def _install(self) -> None:
        """A pre-hook and a post-hook on every block and on the root (for the tensors outside blocks). Tied tensors
        are blended from the checkpoint's one copy wherever they are held."""
        canonical = checkpoint_names(self.model, self.slots, buffers=True)
        for name, tensor in self.model.named_parameters(remove_duplicate=False):
            if id(tensor) not in canonical:
                raise GlueError(f"parameter {name!r} has no tensor in the experts' checkpoints.")

        def entries(modules) -> list[tuple[torch.nn.Module, str, str, torch.Tensor, Slot]]:
            return [(module, store, key, t, self.slots[canonical[id(t)]])
                    for module in modules for store in ("_parameters", "_buffers")
                    for key, t in getattr(module, store).items() if t is not None and id(t) in canonical]

        inside: set[int] = set()
        units = []
        for _, block in layer_blocks(self.model):
            modules = list(block.modules())
            inside.update(id(m) for m in modules)
            units.append((block, entries(modules)))
        units.append((self.model, entries(m for m in self.model.modules() if id(m) not in inside)))
        for unit, own in units:
            if own:
                self._handles.append(unit.register_forward_pre_hook(self._form(own)))
                self._handles.append(unit.register_forward_hook(self._drop(own), always_call=True))

    def _form(self, own: list):
        def hook(unit, args):
            if self._alpha is None:
                raise RuntimeError("on-the-fly template run outside OnTheFlyMatrix.models()")
            formed: dict[str, torch.Tensor] = {}  # a tied tensor is formed once for all its holders
            with torch.no_grad():
                for module, store, key, _, slot in own:
                    if slot.name not in formed:
                        blend = self._blend(slot, self._alpha, search_dtype(slot.dtype))
                        if self._rounded and blend.dtype != slot.dtype:
                            round_to(blend, slot.dtype)
                        formed[slot.name] = blend
                    getattr(module, store)[key] = formed[slot.name]
            self._spare.clear()  # spares of other shapes are not kept: the pool never outgrows one unit

        return hook

    def _drop(self, own: list):
        """A post-hook putting the unit's template tensors (meta parameters, buffers) back; its blends are kept as
        spares for the next unit."""

        def hook(unit, args, output):
            dropped: set[int] = set()
            for module, store, key, original, slot in own:
                blend = getattr(module, store)[key]
                getattr(module, store)[key] = original
                if blend is not original and id(blend) not in dropped:
                    dropped.add(id(blend))
                    self._spare.setdefault((blend.dtype, slot.numel), []).append(blend.view(1, -1))

        return hook
