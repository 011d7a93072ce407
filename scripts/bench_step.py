"""Benchmark one SPSA step against its hardware floor and against a full-gradient mixing step.

For a realistic model config (BERT-base or GPT-2 small, random weights) and K experts, in one run:
  * SPSA step: blend both perturbed models (one product over K·N) + two forward passes + the update;
  * floor: two plain forward passes of one model on the same batch + one pass over K·N + 2·N elements at the
    copy bandwidth measured here;
  * full-gradient step: forward + backward through the blend (the reference GLUE avoids);
  * peak memory of each step above the loaded experts (GPU: allocator peak minus what was allocated before;
    CPU: RSS high-water mark minus RSS before the first step, each mode in a fresh process so memory freed
    by one measurement cannot hide another's), and the absolute peak.
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

import torch

from hf_glue.engine.matrix import ExpertMatrix
from hf_glue.io.experts import TensorInfo
from hf_glue.engine.memory import peak_memory_bytes, reset_peak_memory
from hf_glue.methods.full_gradient import loss_and_grad
from hf_glue.methods.objective import Objective
from hf_glue.optim.spsa import PARAMETRIZATIONS, SPSA
from hf_glue.tasks import get_task


class SyntheticExpert:
    """A base model's tensors plus seeded noise, generated on demand (the matrix holds the only copy)."""

    def __init__(self, name: str, base: dict[str, torch.Tensor], seed: int) -> None:
        self.name, self.base, self.seed = name, base, seed
        self.tensors = {n: TensorInfo(n, tuple(t.shape), t.dtype, None) for n, t in base.items()}

    def iter_tensors(self, names=None):
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        for n, t in self.base.items():
            if names is None or n in names:
                noise = torch.randn(t.shape, generator=gen) * 0.01 if t.dtype.is_floating_point else 0
                yield n, (t.cpu() + noise).to(t.dtype) if t.dtype.is_floating_point else t.cpu()


def build(model_name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config

    if model_name == "bert-base":
        config, task = BertConfig(num_labels=2), get_task("sequence-classification")
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    else:
        config, task = GPT2Config(), get_task("causal-lm")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device).eval()
    state = model.state_dict()
    base = {n: p.detach() for n, p in model.named_parameters()}  # tied weights once, like a checkpoint
    base.update({n: b for n, b in model.named_buffers() if n in state and n not in base})
    return model, task, base, config


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
    """(peak above the loaded experts, absolute peak) of one step of ``mode``, measured in a fresh process."""
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
    model, task, base, config = build(args.model, device, dtype)
    n = sum(t.numel() for t in base.values() if t.dtype.is_floating_point)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    batch["labels"] = (torch.randint(0, 2, (args.batch_size,), generator=gen) if args.model == "bert-base"
                       else ids).to(device)
    inputs = task.model_inputs(batch)
    if args.memory_probe:  # internal: one step of one mode, in this fresh process
        k = args.experts[0]
        matrix = ExpertMatrix.from_experts([SyntheticExpert(f"e{i}", base, seed=i) for i in range(k)], "model",
                                           device=device)
        objective = Objective(matrix, model, task)
        alpha0 = torch.full((1, k), 1.0 / k, dtype=torch.float64)
        cuda = device.startswith("cuda")
        before = torch.cuda.memory_allocated() if cuda else rss_bytes()
        reset_peak_memory(torch.device(device))
        if args.memory_probe == "spsa":
            SPSA(alpha0, "simplex", c=0.05, a=0.01, A=10).step(lambda a: objective.losses(a, batch))
        else:
            loss_and_grad(objective, PARAMETRIZATIONS["simplex"], alpha0, batch)
        synchronize(device)
        peak = peak_memory_bytes(torch.device(device))
        print(json.dumps({"above": peak - before, "peak": peak}))
        return
    elem = torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth(device, min(n, 64 * 2**20))
    with torch.no_grad():
        forward_s, _ = timed(lambda: (model(**inputs), model(**inputs)), device, args.repeats)
    print(f"{args.model} ({n / 1e6:.0f}M parameters, {args.dtype}) on {device}, batch {args.batch_size} x "
          f"{args.seq_len} tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s; two forward passes {forward_s:.3f} s")
    rows = []
    for k in args.experts:
        experts = [SyntheticExpert(f"expert-{i}", base, seed=i) for i in range(k)]
        matrix = ExpertMatrix.from_experts(experts, "model", device=device)
        objective = Objective(matrix, model, task)
        alpha0 = torch.full((1, k), 1.0 / k, dtype=torch.float64)
        spsa = SPSA(alpha0, "simplex", c=0.05, a=0.01, A=10)
        step_s, _ = timed(lambda: spsa.step(lambda a: objective.losses(a, batch)), device, args.repeats)
        floor_s = forward_s + (k * n + 2 * n) * elem / bandwidth
        param, x = PARAMETRIZATIONS["simplex"], alpha0.clone()
        full_s, _ = timed(lambda: loss_and_grad(objective, param, x, batch), device, args.repeats)
        rows.append((k, step_s, floor_s, full_s, *step_memory(args, k, "spsa"), *step_memory(args, k, "full")))
    print("\n| K | SPSA step s | floor s | step / floor | full-gradient step s | full / SPSA time | "
          "SPSA step memory | full-gradient step memory | full / SPSA memory | absolute peaks SPSA / full |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gib = 2**30
    for k, step_s, floor_s, full_s, spsa_above, spsa_peak, full_above, full_peak in rows:
        print(f"| {k} | {step_s:.3f} | {floor_s:.3f} | {step_s / floor_s:.2f} | {full_s:.3f} | "
              f"{full_s / step_s:.2f} | {spsa_above / gib:.2f} GiB | {full_above / gib:.2f} GiB | "
              f"{full_above / max(spsa_above, 1):.2f} | {spsa_peak / gib:.2f} / {full_peak / gib:.2f} GiB |")
    print("Targets: step / floor ≤ 1.3; full / SPSA time ≥ 1.5 and step memory ≥ 1.5 (at batch 32).")
    print("Step memory: peak above the loaded experts (measured in a fresh process per cell).")


if __name__ == "__main__":
    main()
