"""Benchmark the memory strategies: replicated vs sharded vs on-the-fly, per process, in one run.

K = 4 experts of a Llama of ~113M parameters (hidden 768, 12 layers, MLP 3072, 12 heads, the tests' small LM
vocabulary; random weights, each expert a differently perturbed copy; nothing is downloaded) are saved as
safetensors, with the tests' synthetic LM target. Each strategy runs under ``torchrun --nproc_per_node P`` on this
script (``--worker``): every process goes through hf-glue's own path (`pipeline.prepare` with ``--blend`` /
``--shard``), evaluates one SPSA step's two perturbed models once to warm up, frees what a step allocates, and
then measures over ``--steps`` steps (``Objective.losses(alphas[2, G, K], batch)``, the global batch split
across the processes):

  * expert memory: the bytes of expert rows the process holds (all K experts, or its shards);
  * step peak: the peak above what the process held before the measured steps (the loaded experts, template and
    data): on CPU the RSS high-water mark (glibc's mmap threshold fixed at 128 KiB, so freed blocks leave RSS),
    on CUDA the allocator's peak;
  * step time: the median step, and the losses (which must agree between strategies).

Figures are reported as ratios to the replicated run: the machine is shared and noisy.

    OMP_NUM_THREADS=1 python scripts/bench_scale.py                     # CPU, 2 processes (gloo), float32
    python scripts/bench_scale.py --device cuda --processes 1 --dtype bfloat16 --hidden 2048 --layers 16
                                                                        # one GPU: replicated vs on-the-fly
    python scripts/bench_scale.py --tiny                                # hidden 64, 2 layers: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STRATEGIES = {"replicated": ["--blend", "materialized", "--shard", "false"], "sharded": ["--shard", "true"],
              "on-the-fly": ["--blend", "on-the-fly"]}


def build(root: Path, experts: int, hidden: int, layers: int, dtype: torch.dtype) -> tuple[list[str], str, int]:
    """K perturbed copies of one random Llama, with the tests' LM tokenizer, and the LM target data."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_glue import testing

    tokenizer = testing.make_tokenizer([f"t{i}" for i in range(testing.LM_SYMBOLS)])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = []
    for k in range(experts):
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(originals[n] + 0.02 * torch.randn(p.shape, generator=gen).to(dtype))
        path = root / f"expert-{k}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    data = testing.write_dataset(root / "target", "causal-lm", domain=0, n_train=256, n_test=32)
    return paths, str(data), params


def worker(args) -> None:
    """One process of one strategy: prepare, warm up, measure; rank 0 writes every process's figures."""
    from hf_glue import pipeline
    from hf_glue.config import DataConfig, ExpertsConfig, GlueConfig
    from hf_glue.engine.memory import memory_in_use, peak_memory_bytes, reset_peak_memory

    flags = dict(zip(STRATEGIES[args.strategy][::2], STRATEGIES[args.strategy][1::2]))
    experts = ExpertsConfig(experts=args.paths, cpu=args.device == "cpu", dtype=args.dtype,
                            blend=flags.get("--blend", "auto"),
                            shard={"true": True, "false": False}.get(flags.get("--shard")))
    glue = GlueConfig(batch_size=args.batch_size, eval_batch_size=args.batch_size)
    prep = pipeline.prepare(experts, DataConfig(dataset=args.data, max_length=args.max_length), glue)
    device = prep.accelerator.device
    g, k = prep.matrix.num_groups, prep.matrix.num_experts
    alphas = torch.full((2, g, k), 1.0 / k, dtype=torch.float64)
    alphas[0, :, 0] += 0.05
    alphas[1, :, 0] -= 0.05
    batches = pipeline.batch_iterator(prep, glue)
    prep.objective.losses(alphas, next(batches))  # warm-up: kernels, thread pools, first allocations
    prep.matrix.release()  # what a step allocates (product buffers, hooks) is measured from here
    held = memory_in_use(device)
    reset_peak_memory(device)
    times, losses = [], []
    for _ in range(args.steps):
        batch = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(prep.objective.losses(alphas, batch).tolist())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_bytes(device)
    figures = {"rank": prep.accelerator.process_index, "strategy": prep.plan.strategy,
               "expert_bytes": prep.matrix.expert_bytes(), "held_before_step": held,
               "step_peak": None if peak is None or held is None else peak - held,
               "step_seconds": statistics.median(times), "losses": losses}
    from accelerate.utils import gather_object

    every = gather_object([figures])
    if prep.accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(every))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_strategy(name: str, paths: list[str], data: str, args, out: Path) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
           __file__, "--worker", "--strategy", name, "--out", str(out), "--data", data, "--device", args.device,
           "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--steps", str(args.steps), "--paths", *paths]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split across processes)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 1 step: a smoke test")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.tiny:
        args.hidden, args.layers, args.steps = 64, 2, 1
    strategies = [s for s in STRATEGIES if s != "sharded" or args.processes > 1]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, data, params = build(root, args.experts, args.hidden, args.layers, getattr(torch, args.dtype))
        runs = {name: run_strategy(name, paths, data, args, root / f"{name}.json") for name in strategies}
    ref = runs["replicated"]
    mean = lambda runs_, key: statistics.mean(r[key] for r in runs_)  # noqa: E731
    print(f"# bench_scale: K = {args.experts} Llama experts of {params / 1e6:.0f}M parameters ({args.dtype}), "
          f"{args.processes} process(es) on {args.device}, global batch {args.batch_size} x {args.max_length}, "
          f"{args.steps} steps; {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.device == "cuda":
        print(f"# device: {torch.cuda.get_device_name(0)}")
    print("strategy     | held by a process | expert memory / process | × replicated | step peak above held "
          "| × replicated | step time | × replicated | max |Δloss|")
    for name, procs in runs.items():
        peak = mean(procs, "step_peak")
        dloss = max(abs(a - b) for p, q in zip(procs, ref) for x, y in zip(p["losses"], q["losses"])
                    for a, b in zip(x, y))
        print(f"{name:<12} | {mean(procs, 'held_before_step') / 2**20:>13.0f} MiB | "
              f"{mean(procs, 'expert_bytes') / 2**20:>19.0f} MiB | {mean(procs, 'expert_bytes') / mean(ref, 'expert_bytes'):>12.2f} | "
              f"{peak / 2**20:>16.0f} MiB | {peak / mean(ref, 'step_peak'):>12.2f} | "
              f"{max(p['step_seconds'] for p in procs):>7.2f} s | "
              f"{max(p['step_seconds'] for p in procs) / max(p['step_seconds'] for p in ref):>12.2f} | {dloss:.1e}")


if __name__ == "__main__":
    main()
