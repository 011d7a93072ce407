"""Benchmark the search over K LoRA adapters: step time and peak memory against the base model alone.

A base of BERT-base sizes (BertForSequenceClassification, hidden 768, 12 layers, vocab 30522: 109M parameters,
random weights; nothing is downloaded) is saved once, and K PEFT LoRA adapters of it (rank 8 on query and value,
each with its own classification head as ``modules_to_save``, random factors with non-zero B) are built with
``get_peft_model`` and saved with ``save_pretrained``. They are read back through hf-glue's own code path
(`io.hub.resolve` → `read_adapter` → `fetch_adapter_weights` → `engine.adapters.build_search_model`), and for each
K, in one run:

  * time: one SPSA step's evaluations, ``Objective.losses(alphas[2, G, K], batch)`` (blend the two perturbed
    coefficient sets, two forward passes of the base with the K adapters' concatenated LoRA branch), against two
    plain forward passes of the base model on the same batch; the two are timed alternately, median of --repeats
    after one warm-up each;
  * memory: the whole peak of the search (the base, K adapters injected, two steps' buffers) against the base
    alone (the base, two plain forward passes), each above what the process held before the base was loaded, and
    what each holds once loaded (every weight read, before a forward pass). Each is measured in a fresh process,
    as in ``scripts/bench_step.py``, with `hf_glue.engine.memory`'s probes: on CUDA the allocator
    (``torch.cuda.max_memory_allocated``); on CPU the RSS high-water mark, with glibc's mmap threshold fixed at
    128 KiB so that freed blocks leave RSS and RSS follows the bytes allocated. The probes are forked from a
    server that has imported the libraries and nothing else, and each warms up on a tiny model first, so neither
    imports nor one-off set-up count (``--memory-probe MODE --root DIR`` runs one in a fresh interpreter, to
    cross-check; give it MALLOC_MMAP_THRESHOLD_=131072 in its environment).
Figures are reported as ratios: the machine is shared and noisy.

    OMP_NUM_THREADS=1 python scripts/bench_lora.py                # CPU, K = 4 16 64, batch 8 x 128, 3 repeats
    python scripts/bench_lora.py --device cuda --dtype bfloat16   # on a GPU (untested here)
    python scripts/bench_lora.py --tiny --experts 2 4             # hidden 64, 2 layers: a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import synchronize  # noqa: E402

from hf_glue.engine.memory import human, memory_in_use, peak_memory_bytes, reset_peak_memory  # noqa: E402

GIB = 2**30
#: the model every memory probe runs once before it measures anything
WARM_UP = {"hidden": 16, "layers": 1, "heads": 1, "intermediate": 32, "vocab": 100, "seq_len": 8, "batch_size": 2}
TINY = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "vocab": 1000, "seq_len": 32, "batch_size": 4,
        "repeats": 1}


# -- building the base and the adapters -----------------------------------------------------------------------

def bert_config(args):
    from transformers import BertConfig

    return BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=args.intermediate,
                      max_position_embeddings=max(512, args.seq_len), num_labels=2)


def make_base_and_adapters(root: Path, args, count: int) -> tuple[Path, list[Path]]:
    """Save a random base under ``root/base`` and ``count`` LoRA adapters of it under ``root/lora-{k}`` (one PEFT
    model, its factors and head re-drawn per adapter, saved with ``save_pretrained``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(args.seed)
    base = BertForSequenceClassification(bert_config(args)).eval()
    base_path = root / "base"
    base.save_pretrained(base_path)
    config = LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
                        lora_dropout=0.0)
    model = get_peft_model(base, config)  # injects into ``base`` in place: the saved base is the clean one
    gen = torch.Generator().manual_seed(args.seed + 1)
    paths = []
    with torch.no_grad():
        for k in range(count):
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0.0, 0.02, generator=gen)  # B non-zero: every adapter changes the model
                elif "modules_to_save" in name:
                    p.normal_(0.0, 0.02, generator=gen)
            path = root / f"lora-{k}"
            model.save_pretrained(path)
            cfg = json.loads((path / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = str(base_path)
            (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
            paths.append(path)
    return base_path, paths


def load_base(base_path: Path, device: str, dtype: torch.dtype):
    """The base as a merge loads it (`lora._load_base`: ``from_pretrained`` in the run's dtype, on the device)."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(base_path, dtype=dtype).to(device).eval()


def search(base_path: Path, adapter_paths: list[Path], device: str, dtype: torch.dtype, granularity: str):
    """The search's objective over the first K adapters, built by hf-glue's own adapter code path."""
    from hf_glue.engine.adapters import build_search_model
    from hf_glue.io import hub
    from hf_glue.io.adapters import fetch_adapter_weights, read_adapter
    from hf_glue.methods.objective import Objective
    from hf_glue.tasks import get_task

    adapters = [read_adapter(hub.resolve(str(p), what="adapter")) for p in adapter_paths]
    fetch_adapter_weights(adapters)
    model, matrix = build_search_model(load_base(base_path, device, dtype), adapters, granularity)
    return Objective(matrix, model, get_task("sequence-classification")), matrix


def make_batch(args, device: str) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen)
    labels = torch.randint(0, 2, (args.batch_size,), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def step_alphas(num_groups: int, k: int) -> torch.Tensor:
    """The two coefficient sets of one SPSA step around the uniform blend: 1/K ± 0.05·Δ, Δ = ±1."""
    gen = torch.Generator().manual_seed(k)
    delta = torch.randint(0, 2, (num_groups, k), generator=gen).float() * 2 - 1
    center = torch.full((num_groups, k), 1.0 / k)
    return torch.stack([center + 0.05 * delta, center - 0.05 * delta])


# -- measurements -----------------------------------------------------------------------------------------------

def memory_probe(args, base_path: Path, adapter_paths: list[Path]) -> dict:
    """Internal (a fresh process): the whole peak of the base alone (``--memory-probe base``: two plain forward
    passes) or of the search (``search``: K adapters, two steps), above what the process held before the base
    was loaded, and what is held once everything is built and every weight read (before the first forward pass)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    dev = torch.device(device)
    with torch.no_grad():  # warm-up on a tiny model: lazy imports and one-off kernel set-up stay out of the figures
        warm = argparse.Namespace(**{**vars(args), **WARM_UP})
        objective, matrix = search(base_path.parent / "warm-up" / "base", [base_path.parent / "warm-up" / "lora-0"],
                                   device, dtype, args.granularity)
        objective.losses(step_alphas(matrix.num_groups, 1), make_batch(warm, device))
        objective.model.unload()(**make_batch(warm, device))
        del objective, matrix, warm
    batch = make_batch(args, device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    start = memory_in_use(dev)  # imports done, warmed up, batch made, nothing loaded
    reset_peak_memory(dev)
    with torch.no_grad():
        if args.memory_probe == "base":
            model = load_base(base_path, device, dtype)
            touch(model)
            held = memory_in_use(dev)
            for _ in range(2):  # the second pass shows any memory the first one left behind
                model(**inputs), model(**inputs)
        else:
            objective, matrix = search(base_path, adapter_paths, device, dtype, args.granularity)
            touch(objective.model)
            held = memory_in_use(dev)
            alphas = step_alphas(matrix.num_groups, matrix.num_experts)
            for _ in range(2):  # the first step reserves the product buffers, the second reuses them
                objective.losses(alphas, batch)
    synchronize(device)
    peak = peak_memory_bytes(dev)
    return {"held": held - start, "peak": peak - start}


def probe_pool(args):
    """Memory probes run each in a fresh process, forked from a server that has imported the libraries and done
    nothing else (so a probe pays no start-up, and holds no memory of this process's measurements)."""
    import multiprocessing
    import multiprocessing.forkserver
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "hf_glue.engine.adapters", "hf_glue.io.adapters",
                                "hf_glue.methods.objective", "hf_glue.tasks", "hf_glue.engine.memory", "bench_step"])
    # every allocation of 128 KiB or more its own memory map, returned to the system when freed: RSS then follows
    # the bytes allocated (glibc's default threshold grows to 32 MiB, and freed activations stay resident in the heap)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    try:
        multiprocessing.forkserver.ensure_running()  # its imports overlap with building the adapters
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1)


def touch(model: torch.nn.Module) -> None:
    """Read every weight once: ``from_pretrained`` on CPU leaves them in the file's memory map, resident (and counted
    in RSS) only once a forward pass reads them, so "held after loading" would otherwise miss the base."""
    for p in model.parameters():
        p.sum()


def run_probe(pool, args, mode: str, k: int, root: Path) -> dict:
    probe = argparse.Namespace(**{**vars(args), "memory_probe": mode})
    return pool.submit(memory_probe, probe, root / "base", [root / f"lora-{i}" for i in range(k)]).result()


def timed_pair(base_fn, step_fn, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of ``base_fn`` and ``step_fn``, run alternately ``repeats`` times after one warm-up each."""
    base_fn(), step_fn()
    synchronize(device)
    base_t, step_t = [], []
    for _ in range(repeats):
        for fn, times in ((base_fn, base_t), (step_fn, step_t)):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(base_t), statistics.median(step_t)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**20:.0f} MiB)"
    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / GIB:.0f} GiB RAM"
    except ImportError:
        ram = ""
    return f"{os.cpu_count()} vCPU ({model}){ram}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="Numbers of adapters K.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="The base's dtype.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs per K (median); default 3 (1 tiny).")
    parser.add_argument("--batch-size", type=int, default=None, help="Default 8 (4 with --tiny).")
    parser.add_argument("--seq-len", type=int, default=None, help="Tokens per row; default 128 (32 with --tiny).")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter.")
    parser.add_argument("--granularity", default="model", choices=["model", "block", "module", "tensor"])
    parser.add_argument("--tiny", action="store_true",
                        help="A tiny base (hidden 64, 2 layers, vocab 1000), batch 4 x 32, 1 repeat: a smoke test.")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument("--memory-probe", choices=["base", "search"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab": 30522, "seq_len": 128,
                "batch_size": 8, "repeats": 3}
    for name, value in (TINY if args.tiny else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here.")
    dtype = getattr(torch, args.dtype)

    if args.memory_probe:
        k = args.experts[0]
        print(json.dumps(memory_probe(args, args.root / "base", [args.root / f"lora-{i}" for i in range(k)])))
        return

    pool = probe_pool(args)  # started first: the server's imports run beside this process's
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])
    import peft
    import transformers

    info = {"command": command, "seed": args.seed, "machine": machine(args.device), "device": args.device,
            "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "batch": [args.batch_size, args.seq_len], "rank": args.rank, "granularity": args.granularity,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base_path, adapter_paths = make_base_and_adapters(root, args, max(args.experts))
        make_base_and_adapters(root / "warm-up", argparse.Namespace(**{**vars(args), **WARM_UP}), 1)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        batch = make_batch(args, args.device)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        plain = load_base(base_path, args.device, dtype)
        n_base = sum(p.numel() for p in plain.parameters())
        info["base_parameters"] = n_base
        print(f"base: BERT (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {n_base / 1e6:.1f}M "
              f"parameters, {args.dtype}) on {args.device}, batch {args.batch_size} x {args.seq_len} tokens; "
              f"adapters: rank {args.rank} on query and value + classifier head; {info['machine']}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
        base_memory = run_probe(pool, args, "base", 0, root)
        for k in args.experts:
            objective, matrix = search(base_path, adapter_paths[:k], args.device, dtype, args.granularity)
            alphas = step_alphas(matrix.num_groups, k)
            # the concatenated branch's A and B: every adapter's factors (no padding: they share their modules)
            n_adapter = sum(p.numel() for n, p in objective.model.named_parameters() if "lora_" in n)

            def base_fn():
                with torch.no_grad():
                    plain(**inputs), plain(**inputs)

            base_s, step_s = timed_pair(base_fn, lambda: objective.losses(alphas, batch), args.device, args.repeats)
            objective = matrix = None  # free this K's search model before the next
            memory = run_probe(pool, args, "search", k, root)
            row = {"k": k, "adapter_parameters": n_adapter, "base_s": base_s, "step_s": step_s,
                   "time_ratio": step_s / base_s, "base_peak": base_memory["peak"], "search_peak": memory["peak"],
                   "memory_ratio": memory["peak"] / base_memory["peak"], "base_held": base_memory["held"],
                   "search_held": memory["held"], "held_ratio": memory["held"] / base_memory["held"]}
            rows.append(row)
            print(f"K = {k}: step {step_s:.3f} s vs two plain forwards {base_s:.3f} s ({row['time_ratio']:.2f}); "
                  f"peak {human(memory['peak'])} vs {human(base_memory['peak'])} "
                  f"({row['memory_ratio']:.2f})", flush=True)
        pool.shutdown()

    print(f"\n{command}  (seed {args.seed})")
    print("\n| K | adapter parameters (A + B) | SPSA step s | two base forwards s | step / base time | search peak | "
          "base peak | search / base peak | held after loading, search / base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['adapter_parameters'] / 1e6:.2f}M | {r['step_s']:.3f} | {r['base_s']:.3f} | "
              f"{r['time_ratio']:.2f} | {human(r['search_peak'])} | {human(r['base_peak'])} | "
              f"{r['memory_ratio']:.2f} | {r['held_ratio']:.2f} |")
    k16 = next((r for r in rows if r["k"] == 16), None)
    if k16 is not None:
        print(f"\nTarget: search peak with K = 16 <= 1.5 x the base alone: {k16['memory_ratio']:.2f} -> "
              f"{'met' if k16['memory_ratio'] <= 1.5 else 'NOT met'}")
    print("Peaks: the whole high-water mark above what the process held before the base was loaded, each in a fresh "
          "process (CPU: RSS; CUDA: allocator); base: two plain forward passes; search: two SPSA steps' evaluations.")
    if args.json:
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
