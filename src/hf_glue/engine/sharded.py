"""Sharded search: each process holds its rows of every parameter (FSDP2's dim-0 chunk) for all K experts.

Blending is elementwise, so a process blends its own shards with the replicated α straight into the
FSDP-sharded template's local parameters: no weight crosses the network for the blend. FSDP gathers one block
at a time in the forward and frees it after, so a process holds K·N·b/P of experts, N·b/P of model (the 2q
models of a step are formed in it one after another) and the gathered blocks. Every process must run every
forward pass (they are collective): `lockstep` tells `Objective` so.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import torch

from ..io.experts import Expert
from .matrix import (CoefficientLayout, ExpertMatrix, checkpoint_names, exact_product, layer_blocks, layout_slots,
                     round_to)

logger = logging.getLogger(__name__)


def shard_model(model: torch.nn.Module, device: torch.device, processes: int) -> None:
    """FSDP2 (torch's `fully_shard`) over all processes on the template (meta parameters): every block of
    `layer_blocks` — the units on-the-fly blending and the estimate use — that shares no parameter with the rest
    of the model, then the root; then the local shards are allocated on ``device`` and the template's buffers put
    back (``to_empty`` leaves them uninitialised). Every unit is resharded after its forward, the root included
    (by default it keeps its gathered parameters, which would go stale when the next blend is written).

    accelerate's FSDP support is not used: with ``cpu=True`` it is out of reach (accelerate 1.15 gives the FSDP
    distributed type only to GPU-like multi-process runs), and its ``prepare`` either broadcasts a full state dict
    from the main process or keeps the weights it is given, where each process here reads its own rows instead.
    The launch, process group and devices stay accelerate's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes,))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    blocks = layer_blocks(model)
    owners: dict[int, set[int]] = {}  # parameter → the units holding it (a block, or -1: outside every block)
    inside: set[int] = set()
    for i, (_, block) in enumerate(blocks):
        for p in block.parameters():
            owners.setdefault(id(p), set()).add(i)
        inside.update(id(m) for m in block.modules())
    for module in model.modules():
        if id(module) not in inside:
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(-1)
    shared = []
    for i, (name, block) in enumerate(blocks):
        if all(owners[id(p)] == {i} for p in block.parameters()):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        else:  # a tied parameter stays with the root, and with it the block
            shared.append(name)
    if shared:
        logger.warning("sharded: %d block(s) share a parameter with the rest of the model (%s) and are gathered "
                       "with the root for the whole forward pass", len(shared), ", ".join(shared[:3]))
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


class ShardedMatrix(CoefficientLayout):
    """The experts' shards of an FSDP-sharded template, blended in place into its local parameters."""

    lockstep = True

    def __init__(self, experts: Sequence[Expert], model: torch.nn.Module, granularity: str,
                 dtype: Optional[torch.dtype], device: torch.device, process_index: int, processes: int) -> None:
        self.model = model
        self.expert_names = [e.name for e in experts]
        self._device = torch.device(device)
        checkpoint = experts[0].tensors
        canonical = checkpoint_names(model, checkpoint)
        rows: dict[str, tuple[int, int]] = {}
        targets: list[tuple[torch.nn.Parameter, str]] = []
        for name, param in model.named_parameters():
            key = canonical[id(param)]
            first = param.shape[0]
            chunk = -(-first // processes)  # torch.chunk's split, as FSDP2 shards dim 0
            start = min(process_index * chunk, first)
            rows[key] = (start, start + param.to_local().shape[0])
            targets.append((param, key))
        for name, tensor in model.named_parameters(remove_duplicate=False):  # a tied copy the checkpoint also holds
            if name in checkpoint and name not in rows:
                rows[name] = rows[canonical[id(tensor)]]
        self.shards = ExpertMatrix.from_experts(experts, granularity, dtype=dtype, device=device, rows=rows)
        self.groups, self.slots = layout_slots(experts[0], granularity, dtype)  # whole tensors: the model's
        self._count_groups(self.slots.values())
        buffers = dict(model.named_buffers())
        self._targets = targets + [(buffers[n], n) for n in self.shards.slots if n in buffers]
        self.constants: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in self.shards.constants.items():
                if name in buffers:
                    buffers[name].copy_(tensor)
        self.offset = False
        self.task_vectors = None

    def expert_bytes(self) -> int:
        return self.shards.expert_bytes()

    def product_bytes(self) -> int:
        return 0

    def models(self, alphas: torch.Tensor, *, rounded: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Writes each θ(α)'s shards into the template in turn; the caller runs it (on every process) meanwhile.
        ``rounded``: the saved model's weights (`ExpertMatrix.models`)."""
        alphas = alphas.unsqueeze(0) if alphas.dim() == 2 else alphas
        for alpha in alphas.to(self._device, torch.float32):
            self._write(alpha, rounded)
            yield {}

    def materialize(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact θ(α), gathered whole into the main process's CPU memory (collective: every process calls it;
        the others get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._write(alpha.reshape(self.num_groups, self.num_experts).to(self._device, torch.float32))
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # the template runs in the search's dtype (float32 for half experts): the saved model is rounded once,
        # tensor by tensor in place (each float32 copy is freed as its rounded one is made)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                state[key] = tensor.to(self.slots[key].dtype if key in self.slots else self.model_dtype)
        return state

    def release(self, experts: bool = False) -> None:
        if experts:
            self.shards.release(experts=True)

    def _write(self, alpha: torch.Tensor, rounded: bool = False) -> None:
        """θ(α)'s shards, exact (float32 α and accumulation), written into the template's own local shards;
        ``rounded``: rounded to the experts' dtype, as the saved model holds them."""
        shards = self.shards
        self.model.reshard()  # no gathered copy of an earlier blend may outlive it
        with torch.no_grad():
            for tensor, name in self._targets:
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                if local.numel() == 0:
                    continue
                slot = shards.slots[name]
                e = shards.buffers[slot.dtype][:, slot.offset: slot.offset + slot.numel]
                a = alpha[slot.group: slot.group + 1]
                if local.is_contiguous():
                    exact_product(a, e, local.view(1, -1))
                else:
                    out = torch.empty(1, slot.numel, dtype=local.dtype, device=self._device)
                    exact_product(a, e, out)
                    local.copy_(out.view(local.shape))
                if rounded and local.dtype != slot.dtype:
                    round_to(local, slot.dtype)
