"""Benchmark one SPSA step against its hardware floor and against a full-gradient mixing step.

For a realistic model config (BERT-base or GPT-2 small, random weights) and K experts, in one run:
  * SPSA step: blend both perturbed models (one product over K·N) + two forward passes + the update;
  * floor: two plain forward passes of one model on the same batch + one pass over K·N + 2·N elements at the
    copy bandwidth measured here;
  * full-gradient step: forward + backward through the blend (the reference GLUE avoids);
  * peak memory of each step above the loaded experts (GPU: allocator peak minus what was allocated before;
    CPU: RSS high-water mark minus RSS before the first step, each mode in a fresh process so memory freed
    by one measurement cannot hide another's), and the whole peak above what the process held before the
    experts were loaded (allocator or RSS) against the pre-check's estimate: (K + 2)·N·b + activations for
    SPSA, K·N·b + the blended model + its gradient + every layer's activations for full-gradient. The probe
    holds what a merge holds: the expert matrix and a template whose parameters are on the meta device.
Figures are medians of --repeats after one warm-up, reported as ratios; the machine is shared and noisy.

    python scripts/bench_step.py                         # CPU, BERT-base, K = 2 4 8, batch 32, seq 128
    python scripts/bench_step.py --device cuda --dtype bfloat16 --model gpt2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

from hf_glue.engine.matrix import ExpertMatrix, search_dtype
from hf_glue.engine.memory import estimate, peak_memory_bytes, reset_peak_memory
from hf_glue.io.experts import TensorInfo
from hf_glue.methods.full_gradient import loss_and_grad
from hf_glue.methods.objective import Objective
from hf_glue.optim.spsa import SPSA, make_parametrization
from hf_glue.tasks import get_task


class SyntheticExpert:
    """Seeded tensors of a checkpoint's names and shapes, generated on demand (the matrix holds the only copy):
    ``base`` plus noise, or noise alone (the memory probe builds no real model)."""

    def __init__(self, name: str, tensors: dict[str, TensorInfo], seed: int,
                 base: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.name, self.tensors, self.seed, self.base = name, tensors, seed, base

    def iter_tensors(self, names=None, rows=None):  # rows: a process's shards (not used: one process here)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        for n, info in self.tensors.items():
            if names is not None and n not in names:
                continue
            if not info.dtype.is_floating_point:
                yield n, self.base[n].cpu()
                continue
            noise = torch.randn(info.shape, generator=gen) * 0.01
            yield n, (noise if self.base is None else self.base[n].cpu() + noise).to(info.dtype)


def build(model_name: str, device: str, dtype: torch.dtype, real: bool = True):
    """The model's task and config, a template with its parameters on the meta device and real buffers (as
    `pipeline.build_model` makes it), the checkpoint's tensors, and (``real``) the model with random weights
    and those tensors' values."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config

    if model_name == "bert-base":
        config, task, auto = BertConfig(num_labels=2), get_task("sequence-classification"), \
            AutoModelForSequenceClassification
    else:
        config, task, auto = GPT2Config(), get_task("causal-lm"), AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):  # the search runs float32 blends of half experts
        template = auto.from_config(config, dtype=search_dtype(dtype))
    config.architectures = [type(template).__name__]
    template.tie_weights()
    template.eval()
    for module in template.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device))
    tensors = {n: TensorInfo(n, tuple(p.shape), dtype if p.is_floating_point() else p.dtype, None)
               for n, p in template.named_parameters()}
    if not real:
        return task, config, template, tensors, None, None
    model = auto.from_config(config, dtype=dtype).to(device).eval()
    state = model.state_dict()
    base = {n: p.detach() for n, p in model.named_parameters()}  # tied weights once, like a checkpoint
    base.update({n: b for n, b in model.named_buffers() if n in state and n not in base})
    tensors = {n: TensorInfo(n, tuple(t.shape), t.dtype, None) for n, t in base.items()}
    return task, config, template, tensors, model, base


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` calls after one warm-up, and the peak memory across them."""
    dev = torch.device(device)
    fn()
    synchronize(device)
    reset_peak_memory(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_memory_bytes(dev) or 0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def step_memory(args, k: int, mode: str) -> tuple[int, int]:
    """(peak above the loaded experts, peak above the process before loading) of one step of ``mode``, measured
    in a fresh process."""
    cmd = [sys.executable, __file__, "--model", args.model, "--experts", str(k), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--device", args.device, "--dtype", args.dtype, "--memory-probe", mode]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    return out["above"], out["peak"]


def copy_bandwidth(device: str, numel: int) -> float:
    """Bytes per second of a plain device copy (read + write), the floor of streaming the expert matrix."""
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() * src.element_size() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert-base", "gpt2"], default="bert-base")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--memory-probe", choices=["spsa", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    task, config, template, tensors, model, base = build(args.model, device, dtype, real=not args.memory_probe)
    n = sum(i.numel for i in tensors.values() if i.dtype.is_floating_point)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    batch["labels"] = (torch.randint(0, 2, (args.batch_size,), generator=gen) if args.model == "bert-base"
                       else ids).to(device)
    inputs = task.model_inputs(batch)
    if args.memory_probe:  # internal: one step of one mode in this fresh process, holding what a merge holds
        start = allocated_bytes(device)  # imports done, template built, no weights loaded yet
        k = args.experts[0]
        matrix = ExpertMatrix.from_experts([SyntheticExpert(f"e{i}", tensors, seed=i) for i in range(k)], "model",
                                           device=device)
        objective = Objective(matrix, template, task)
        alpha0 = torch.full((1, k), 1.0 / k, dtype=torch.float64)
        before = allocated_bytes(device)
        reset_peak_memory(torch.device(device))
        if args.memory_probe == "spsa":
            SPSA(alpha0, "simplex", c=0.05, a=0.01, A=10).step(lambda a: objective.losses(a, batch))
        else:
            loss_and_grad(objective, make_parametrization("simplex"), alpha0, batch)
        synchronize(device)
        peak = peak_memory_bytes(torch.device(device))
        print(json.dumps({"above": peak - before, "peak": peak - start}))
        return
    elem = torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth(device, min(n, 64 * 2**20))
    with torch.no_grad():
        forward_s, _ = timed(lambda: (model(**inputs), model(**inputs)), device, args.repeats)
    print(f"{args.model} ({n / 1e6:.0f}M parameters, {args.dtype}) on {device}, batch {args.batch_size} x "
          f"{args.seq_len} tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s; two forward passes {forward_s:.3f} s")
    times, memory = [], []
    for k in args.experts:
        experts = [SyntheticExpert(f"expert-{i}", tensors, seed=i, base=base) for i in range(k)]
        matrix = ExpertMatrix.from_experts(experts, "model", device=device)
        objective = Objective(matrix, template, task)
        alpha0 = torch.full((1, k), 1.0 / k, dtype=torch.float64)
        spsa = SPSA(alpha0, "simplex", c=0.05, a=0.01, A=10)
        step_s, _ = timed(lambda: spsa.step(lambda a: objective.losses(a, batch)), device, args.repeats)
        floor_s = forward_s + (k * n + 2 * n) * elem / bandwidth
        param, x = make_parametrization("simplex"), alpha0.clone()
        full_s, _ = timed(lambda: loss_and_grad(objective, param, x, batch), device, args.repeats)
        times.append((k, step_s, floor_s, full_s))
        del experts, matrix, objective, spsa  # the memory probes run in fresh processes beside this one
        memory.append((k, *step_memory(args, k, "spsa"), *step_memory(args, k, "full"),
                       *estimates(args, config, tensors, k)))
    print("\n| K | SPSA step s | floor s | step / floor | full-gradient step s | full / SPSA time |")
    print("|---|---|---|---|---|---|")
    for k, step_s, floor_s, full_s in times:
        print(f"| {k} | {step_s:.3f} | {floor_s:.3f} | {step_s / floor_s:.2f} | {full_s:.3f} | {full_s / step_s:.2f} |")
    print("\n| K | SPSA step memory | full-gradient step memory | full / SPSA memory | SPSA peak / estimate | "
          "full-gradient peak / estimate |")
    print("|---|---|---|---|---|---|")
    gib = 2**30
    for k, spsa_above, spsa_peak, full_above, full_peak, spsa_est, full_est in memory:
        print(f"| {k} | {spsa_above / gib:.2f} GiB | {full_above / gib:.2f} GiB | "
              f"{full_above / max(spsa_above, 1):.2f} | {spsa_peak / gib:.2f} / {spsa_est / gib:.2f} GiB "
              f"({spsa_peak / spsa_est:.2f}) | {full_peak / gib:.2f} / {full_est / gib:.2f} GiB "
              f"({full_peak / full_est:.2f}) |")
    print("Targets: step / floor ≤ 1.3; full / SPSA time ≥ 1.5 and step memory ≥ 1.5 (at batch 32); SPSA peak within "
          "10 % of its estimate.")
    print("Step memory: peak above the loaded experts; peak: the whole peak above what the process held before the "
          "experts were loaded (GPU: allocator; CPU: RSS), each measured in a fresh process per cell.")


def allocated_bytes(device: str) -> int:
    """What is held now: allocated device memory on GPU, the process's RSS on CPU."""
    return torch.cuda.memory_allocated() if device.startswith("cuda") else rss_bytes()


def estimates(args, config, tensors: dict[str, TensorInfo], k: int) -> tuple[int, int]:
    """The pre-check's estimates (bytes) of an SPSA step (q = 1) and of a full-gradient step."""
    floats = [i for i in tensors.values() if i.dtype.is_floating_point]
    elements = {floats[0].dtype: sum(i.numel for i in floats)}
    common = {"batch_per_process": args.batch_size, "sequence_length": args.seq_len, "tensors": len(floats)}
    spsa = estimate(elements, k, config.to_dict(), models_per_step=2, **common)
    full = estimate(elements, k, config.to_dict(), models_per_step=1, backward=True, **common)
    return spsa.total, full.total

if __name__ == "__main__":
    main()
