"""Estimate a run's memory before loading anything, and refuse early (with advice) when it cannot fit.

The estimate is deliberately simple and slightly pessimistic: K expert copies (the blending matrix), the 2q
blended models of an SPSA step, the template and final model, and one forward pass's activations (all layers'
for the full-gradient reference, which keeps them for backward).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import GlueError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"20GiB"``, ``"512MB"``, ``"1.5GB"`` or a byte count → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise GlueError(f"cannot read memory size {text!r}: use a number with a unit, e.g. 20GiB or 512MB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class MemoryEstimate:
    experts: int
    blends: int
    models: int
    activations: int

    @property
    def total(self) -> int:
        return self.experts + self.blends + self.models + self.activations

    def describe(self) -> str:
        return (f"{human(self.total)} (experts {human(self.experts)}, blended models {human(self.blends)}, "
                f"template and result {human(self.models)}, activations {human(self.activations)})")


def estimate(
    elements_by_dtype: dict[torch.dtype, int],
    num_experts: int,
    model_config: dict,
    *,
    models_per_step: int,
    batch_per_process: int,
    sequence_length: int,
    backward: bool = False,
) -> MemoryEstimate:
    """Bytes a run needs on one device (each process holds all K experts)."""
    n_bytes = sum(n * torch.empty((), dtype=dt).element_size() for dt, n in elements_by_dtype.items())
    cfg = model_config
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 768
    if isinstance(hidden, list):
        hidden = max(hidden)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 12
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 12
    vocab = cfg.get("vocab_size") or 0
    tokens = batch_per_process * sequence_length
    per_layer = tokens * hidden * 4 * 16 + batch_per_process * heads * sequence_length ** 2 * 4 * 2
    logits = tokens * vocab * 4 * 2 if cfg.get("architectures", [""])[0].endswith(("CausalLM", "LMHeadModel")) else 0
    activations = per_layer * (layers if backward else 2) + logits
    if backward:  # float32 gradients of the blended parameters
        activations += 4 * sum(elements_by_dtype.values())
    return MemoryEstimate(experts=num_experts * n_bytes, blends=models_per_step * n_bytes, models=2 * n_bytes,
                          activations=activations)


def available(device: torch.device) -> int:
    """Free memory on ``device`` (GPU: free device memory; CPU: available system memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(est: MemoryEstimate, budget: int, *, device: torch.device, dtype_is_full: bool,
               samples: int, where: str) -> None:
    """Raise a `GlueError` with concrete advice when ``est`` exceeds ``budget``."""
    if est.total <= budget:
        return
    advice = []
    if dtype_is_full:
        advice.append("--dtype bfloat16 (halves the expert copies; blending still accumulates in float32)")
    if samples > 1:
        advice.append("--spsa-samples 1 (fewer blended models per step)")
    if est.activations > est.total * 0.2:
        advice.append("a smaller --batch-size or --max-length (activations)")
    advice.append("fewer experts, or a device with more memory (each process holds all experts)")
    raise GlueError(f"this run needs about {est.describe()} but {where} has {human(budget)} on {device}: try "
                    + "; ".join(advice) + ".")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """Peak accelerator memory since the last reset, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except ImportError:
        return None
