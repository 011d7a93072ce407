"""Estimate a run's memory before loading anything, and refuse early (with advice) when it cannot fit.

Replicated strategy (every process holds all K experts of N elements of b bytes): (K + 2q)·N·b for the
expert matrix and the 2q blended models of an SPSA step, plus those models' bookkeeping (views, loss
statistics) and one layer's activations. The template model has no weights (meta device) and the final model
is built after the search's buffers are freed, so neither adds to the peak. The full-gradient reference holds
one blended model, its gradient and every layer's activations for backward.
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
from dataclasses import dataclass
from pathlib import Path
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


#: Bookkeeping per blended model held at once, measured with torch 2.13: per tensor, its cached view (a tensor
#: object) and dict entry (~650 B); per model, its loss statistics kept until all 2q are scored (~6 KiB). It
#: dominates for tiny models at a large --spsa-samples (+40 % on 87 KB of weights).
VIEW_BYTES = 700
MODEL_BYTES = 8 << 10


@dataclass
class MemoryEstimate:
    experts: int
    blends: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.experts + self.blends + self.gradients + self.activations

    def describe(self) -> str:
        grads = f", gradients {human(self.gradients)}" if self.gradients else ""
        return (f"{human(self.total)} (experts {human(self.experts)}, blended models {human(self.blends)}{grads}, "
                f"activations {human(self.activations)})")


def layout_bytes(elements_by_dtype: dict[torch.dtype, int], widened: bool = False) -> int:
    """Bytes of the blended tensors as the experts hold them, or (``widened``) as the search's blends do."""
    from .matrix import search_dtype

    return sum(n * torch.empty((), dtype=search_dtype(dt) if widened else dt).element_size()
               for dt, n in elements_by_dtype.items())


def search_element_bytes(elements_by_dtype: dict[torch.dtype, int], widened: bool = True) -> int:
    """Bytes per element of the search template's weights and activations (``widened``: float32 for half
    precision)."""
    from .matrix import search_dtype

    sizes = {torch.empty((), dtype=search_dtype(dt) if widened else dt).element_size() for dt in elements_by_dtype}
    return sizes.pop() if len(sizes) == 1 else 4


def estimate(
    elements_by_dtype: dict[torch.dtype, int],
    num_experts: int,
    model_config: dict,
    *,
    models_per_step: int,
    batch_per_process: int,
    sequence_length: int,
    tensors: int = 0,
    backward: bool = False,
    widened: bool = True,
) -> MemoryEstimate:
    """Bytes a run needs on one device: K·N·b experts, ``models_per_step`` blended models (2q for SPSA) of
    N·b' each plus their bookkeeping (``tensors`` blended tensors), activations (one layer at a time, or every
    layer's kept for ``backward``) and, for ``backward``, the blended parameters' gradients (N·b'). b' is the
    search's bytes per element: float32 for half-precision experts (`matrix.search_dtype`), unless ``widened`` is
    False (a PEFT base runs in its own dtype)."""
    n_bytes = layout_bytes(elements_by_dtype)
    search = layout_bytes(elements_by_dtype, widened)
    act = search_element_bytes(elements_by_dtype, widened)  # activations run in the search template's dtype
    cfg = model_config
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 768
    if isinstance(hidden, list):
        hidden = max(hidden)
    inner = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden
    if isinstance(inner, list):
        inner = max(inner)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 12
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 12
    vocab = cfg.get("vocab_size") or 0
    tokens = batch_per_process * sequence_length
    # a layer's live tensors: its input, q/k/v/context and the MLP's two intermediates, attention scores and
    # probabilities where the kernel materialises them
    per_layer = (tokens * (6 * hidden + 2 * inner) + 2 * batch_per_process * heads * sequence_length ** 2) * act
    causal = (cfg.get("architectures") or [""])[0].endswith(("CausalLM", "LMHeadModel"))
    # the logits (activation dtype), their float32 copy, its log-softmax (and its gradient)
    logits = tokens * vocab * (act + 8 + (4 if backward else 0)) if causal else 0
    return MemoryEstimate(
        experts=num_experts * n_bytes,
        blends=models_per_step * (search + tensors * VIEW_BYTES + MODEL_BYTES),
        gradients=search if backward else 0,
        activations=per_layer * (layers if backward else 1) + logits,
    )


#: a strategy fits when its estimate is at most this share of the budget: the caching allocator's fragmentation,
#: the CUDA context and library workspaces take the rest
HEADROOM = 0.9

#: the memory strategies, in the order `choose` prefers them (fastest first)
STRATEGIES = ("replicated", "sharded", "on-the-fly", "offload-cpu", "offload-disk")


@dataclass
class Plan:
    """One memory strategy for a run: what each device holds, what the host holds, and the bytes an SPSA step
    moves over its slowest link."""

    strategy: str
    memory: MemoryEstimate
    host: int = 0
    moved: int = 0
    link: str = "device memory"

    def fits(self, budget: int, host_budget: Optional[int] = None) -> bool:
        return self.memory.total <= HEADROOM * budget and (host_budget is None or self.host <= HEADROOM * host_budget)


@dataclass(frozen=True)
class Layout:
    """What the strategies' arithmetic needs from a checkpoint's tensors (headers or a meta model): bytes of all
    blended tensors, of the largest block (`matrix.layer_blocks`: formed or gathered one at a time), of the
    tensors outside blocks (embeddings, heads: formed or gathered with the root, for the whole forward) and of
    the largest tensor (offloaded: its K rows are copied over at once)."""

    elements: dict
    total: int
    block: int
    outside: int
    tensor: int
    tensors: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: Optional[torch.dtype] = None
           ) -> "Layout":
        """From ``name → (shape, dtype)`` of a checkpoint's floating tensors; ``dtype`` overrides theirs."""
        from .matrix import _LAYER_INDEX

        elements: dict[torch.dtype, int] = {}
        blocks: dict[str, int] = {}
        outside = largest = total = 0
        for name, (shape, dt) in shapes.items():
            dt = dtype or dt
            n = math.prod(shape)
            nbytes = n * torch.empty((), dtype=dt).element_size()
            elements[dt] = elements.get(dt, 0) + n
            total += nbytes
            largest = max(largest, nbytes)
            match = _LAYER_INDEX.match(name)
            if match:
                blocks[match.group(1)] = blocks.get(match.group(1), 0) + nbytes
            else:
                outside += nbytes
        return cls(elements, total, max(blocks.values(), default=0), outside, largest, len(shapes))


def plans(layout: Layout, num_experts: int, model_config: dict, *, models_per_step: int, batch_per_process: int,
          sequence_length: int, processes: int = 1, backward: bool = False, perturbation: bool = False,
          widened: bool = True) -> dict[str, Plan]:
    """Every strategy's memory per device and traffic per SPSA step (M = ``models_per_step`` blended models of
    N·b', K = ``num_experts`` rows of N·b, P = ``processes``; b' = b but 4 for half-precision experts, whose blends
    the search forms in float32 so the perturbation survives):

    - replicated: K·N·b + M·N·b' on every device; the blend reads K·N·b and writes M·N·b' of device memory.
    - on-the-fly: K·N·b + one block's blend + the tensors outside blocks (in b'); each of the M forward passes
      reads the K experts (M·K·N·b).
    - sharded: K·N·b/P + the model's own shard N·b'/P (the M models are formed in it one after another) + the
      gathered tensors (two blocks, FSDP prefetching the next, and those outside blocks); each forward
      all-gathers (P−1)/P·N·b per process, and with ``perturbation`` every process runs all P·M models.
    - offload-cpu / offload-disk: as on-the-fly, with the experts in CPU memory or their files and one tensor's K
      rows on the device at a time; M·K·N·b cross to the device per step.
    ``backward`` (full-gradient) keeps every layer and a gradient: only replicated applies.
    """
    n_bytes = layout.total
    searched = layout_bytes(layout.elements, widened)  # N·b': the search's blends (float32 for half)
    widen = searched / max(n_bytes, 1)
    common = {"batch_per_process": batch_per_process, "sequence_length": sequence_length}
    replicated = estimate(layout.elements, num_experts, model_config, models_per_step=models_per_step,
                          tensors=layout.tensors, backward=backward, widened=widened, **common)
    out = {"replicated": Plan("replicated", replicated,
                              moved=num_experts * n_bytes + models_per_step * searched)}
    if backward:
        return out
    activations = replicated.activations
    formed = round((layout.block + layout.outside) * widen)
    streamed = models_per_step * num_experts * n_bytes
    out["on-the-fly"] = Plan("on-the-fly", MemoryEstimate(num_experts * n_bytes, formed, 0, activations),
                             moved=streamed)
    if processes > 1:
        gathered = round((2 * layout.block + layout.outside) * widen)
        forwards = models_per_step * (processes if perturbation else 1)
        out["sharded"] = Plan(
            "sharded", MemoryEstimate(-(-num_experts * n_bytes // processes), -(-searched // processes) + gathered, 0,
                                      activations),
            moved=forwards * searched * (processes - 1) // processes, link="network (all-gather)")
    staged = MemoryEstimate(num_experts * layout.tensor, formed, 0, activations)
    out["offload-cpu"] = Plan("offload-cpu", staged, host=num_experts * n_bytes, moved=streamed, link="host → device")
    out["offload-disk"] = Plan("offload-disk", staged, moved=streamed, link="disk → device")
    return {name: out[name] for name in STRATEGIES if name in out}


def choose(candidates: dict[str, Plan], budget: int, host_budget: Optional[int] = None,
           device_type: str = "cuda") -> Optional[Plan]:
    """The fastest strategy that fits: replicated, sharded, on-the-fly, offloaded to CPU memory (where the device
    is the CPU itself, that is on-the-fly), offloaded to disk; None when none does."""
    for name in [*STRATEGIES, *(n for n in candidates if n not in STRATEGIES)]:  # lora: the only one for adapters
        plan = candidates.get(name)
        if plan is None or (name == "offload-cpu" and device_type == "cpu" and "on-the-fly" in candidates):
            continue
        if plan.fits(budget, host_budget):
            return plan
    return None


def available(device: torch.device) -> int:
    """Free memory on ``device`` (GPU: free device memory; CPU: available system memory, or the room left under
    this process's cgroup limit where smaller: in a container, psutil reports the host's memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    free = int(psutil.virtual_memory().available)
    room = cgroup_room()
    return free if room is None else min(free, room)


def cgroup_room(proc: Path = Path("/proc/self/cgroup"), sysfs: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v1 or v2); None where there is no limit."""
    try:
        entries = [line.split(":", 2) for line in proc.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    rooms = []
    for _, controllers, path in entries:
        if controllers == "":
            root, names = sysfs, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, names = sysfs / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for folder in (root / path.lstrip("/"), root):  # the cgroup's folder, or a container's own root
            try:
                limit, usage = ((folder / name).read_text().strip() for name in names)
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 2**60:  # "max" (v2) or a huge number (v1): no limit
                rooms.append(max(0, int(limit) - int(usage)))
            break
    return min(rooms) if rooms else None


def advice(candidates: dict[str, Plan], *, device_type: str, dtype_is_full: bool, samples: int, processes: int,
           excluded: set = frozenset(), others: Optional[dict[str, Plan]] = None, budget: Optional[int] = None
           ) -> list[str]:
    """What would make a run fit, given the smallest allowed plan: never a strategy this run cannot use
    (``excluded``), nor one of ``others`` (every plan) that would not fit ``budget`` either."""
    est = min(candidates.values(), key=lambda p: p.memory.total).memory
    out = []
    if dtype_is_full:
        out.append("--dtype bfloat16 (halves the expert copies; blending still accumulates in float32)")
    if samples > 1 and est.blends > est.experts:
        out.append("--spsa-samples 1 (fewer blended models per step)")
    if est.activations > est.total * 0.2:
        out.append("a smaller --batch-size or --max-length (activations)")

    def open_(name: str) -> bool:  # a strategy the flags ruled out but this run could use, and that fits
        fits = others is None or budget is None or (name in others and others[name].fits(budget))
        return "lora" not in candidates and name not in candidates and name not in excluded and fits

    if open_("on-the-fly"):
        out.append("--blend on-the-fly (the experts and one block; no whole blended models)")
    if processes == 1 and "lora" not in candidates and "sharded" not in excluded:
        out.append("several processes with --shard (each holds 1/P of the experts)")
    if device_type == "cuda" and (open_("offload-cpu") or open_("offload-disk")):
        out.append("--offload cpu or disk (the experts off the device)")
    out.append("fewer experts, or a device with more memory")
    return out


def refuse(candidates: dict[str, Plan], budget: int, *, device: torch.device, where: str, **why) -> None:
    """Raise a `GlueError` naming the smallest allowed strategy's needs and `advice` (``why``: its arguments)."""
    plan = min(candidates.values(), key=lambda p: p.memory.total)
    tips = advice(candidates, device_type=device.type, budget=budget, **why)
    raise GlueError(f"this run needs about {plan.memory.describe()} ({plan.strategy}) but {where} has "
                    f"{human(budget)} on {device} ({HEADROOM:.0%} usable): try " + "; ".join(tips) + ".")


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
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except ImportError:
        return None


def memory_in_use(device: torch.device) -> Optional[int]:
    """Memory held now, the baseline a method's peak is measured above: allocated CUDA memory, or on CPU the
    process's resident set (VmRSS, which `reset_peak_memory` sets the high-water mark to); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    gc.collect()
    try:  # hand freed heap back to the OS, or a method reusing an earlier one's freed memory would show no peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _status_bytes("VmRSS")


def _status_bytes(key: str) -> Optional[int]:
    """A size from /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
