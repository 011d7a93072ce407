"""Benchmark the final blend + save against mergekit's `linear` merge of the same files and weights.

Three random-weight Llama experts (hidden 768, 12 layers, intermediate 3072, vocab 32000: ~162M parameters)
are saved as safetensors in float32 and bfloat16; both tools merge them with the same weights as whole
commands (start-up included), and the outputs are compared tensor by tensor. Wall time and peak RSS are
measured per command in a fresh wrapper process; the figures printed are ratios from this one run.

    python scripts/bench_blend.py                      # installs mergekit into a throw-away venv if needed
    python scripts/bench_blend.py --mergekit-venv /tmp/mk-venv --dtypes float32

mergekit is installed from PyPI into its own venv (torch==2.13.0 first, so pip takes the local CPU build);
if that fails the comparison is skipped with a message and hf-glue's own figures are still printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WEIGHTS = [0.5, 0.3, 0.2]
WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
print(json.dumps({"rc": proc.returncode, "seconds": seconds, "err": proc.stderr[-2000:],
                  "max_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under a fresh wrapper: wall seconds and the command's own peak RSS (bytes)."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{result['err']}")
    return result


def best(runs: list[dict]) -> dict:
    """Fastest wall time of the repeats (least disturbed by the shared machine), highest peak RSS."""
    return {"seconds": min(r["seconds"] for r in runs), "max_rss": max(r["max_rss"] for r in runs),
            "all_seconds": [round(r["seconds"], 2) for r in runs]}


def make_experts(root: Path, dtype_name: str) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        shell = LlamaForCausalLM(config)
    base = {name: torch.randn(t.shape) * 0.02 for name, t in shell.state_dict().items()}
    paths = []
    for k in range(3):
        path = root / f"{dtype_name}-expert-{k}"
        model = LlamaForCausalLM(config)
        state = {name: (t + torch.randn(t.shape) * 0.01).to(dtype) for name, t in base.items()}
        model.load_state_dict(state, strict=False, assign=True)
        model.save_pretrained(path)
        paths.append(path)
    n = sum(t.numel() for t in base.values())
    print(f"built 3 Llama experts ({n / 1e6:.0f}M parameters each, {dtype_name}) in {root}")
    return paths


def ensure_mergekit(venv: Path) -> Path | None:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit into {venv} (throw-away venv) ...")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "torch==2.13.0"],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "mergekit"]]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            print("mergekit could not be installed; skipping the comparison.")
            return None
    return exe


def load_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def compare_outputs(a: Path, b: Path, dtype_name: str) -> float:
    ta, tb = load_all(a), load_all(b)
    if ta.keys() != tb.keys():
        raise SystemExit(f"outputs differ in tensor names: {sorted(ta.keys() ^ tb.keys())[:5]}")
    worst = 0.0
    for name in ta:
        diff = (ta[name].double() - tb[name].double()).abs().max().item()
        scale = tb[name].double().abs().max().item() or 1.0
        worst = max(worst, diff / scale)
    tolerance = 1e-6 if dtype_name == "float32" else 2 ** -7
    status = "agree" if worst <= tolerance else "DIFFER"
    print(f"  outputs {status} tensor by tensor: max |Δ| / max|θ| = {worst:.2e} (tolerance {tolerance:.0e})")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--mergekit-venv", default=str(Path(tempfile.gettempdir()) / "hf-glue-mergekit-venv"))
    parser.add_argument("--workdir", default=None, help="Where experts and outputs go (default: a temp folder).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each tool, alternated; the fastest counts.")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-blend-"))
    work.mkdir(parents=True, exist_ok=True)
    mergekit = ensure_mergekit(Path(args.mergekit_venv))
    hf_glue = shutil.which("hf-glue") or sys.exit("hf-glue is not on PATH: pip install -e . first")
    rows = []
    for dtype_name in args.dtypes:
        experts = make_experts(work, dtype_name)
        os.sync()  # no write-back of the fresh files during the timed runs
        out_glue, out_mk = work / f"{dtype_name}-hf-glue", work / f"{dtype_name}-mergekit"
        glue_cmd = [hf_glue, "blend", "--experts", *map(str, experts), "--weights", *map(str, WEIGHTS),
                    "--output-dir", str(out_glue), "--overwrite-output-dir"]
        config = work / f"{dtype_name}-mergekit.yaml"
        config.write_text(
            "merge_method: linear\nmodels:\n"
            + "".join(f"  - model: {p}\n    parameters:\n      weight: {w}\n" for p, w in zip(experts, WEIGHTS))
            + f"dtype: {dtype_name}\n")
        mk_cmd = [str(mergekit), str(config), str(out_mk), "--no-copy-tokenizer", "--quiet"] if mergekit else None
        glue_runs, mk_runs = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine state
            glue_runs.append(measure(glue_cmd))
            if mk_cmd:
                shutil.rmtree(out_mk, ignore_errors=True)
                mk_runs.append(measure(mk_cmd))
        row = {"dtype": dtype_name, "hf-glue": best(glue_runs)}
        glue = row["hf-glue"]
        print(f"{dtype_name}: hf-glue blend   {glue['seconds']:.2f} s (runs {glue['all_seconds']}), "
              f"peak RSS {glue['max_rss'] / 2**30:.2f} GiB")
        if mk_runs:
            row["mergekit"] = mk = best(mk_runs)
            print(f"{dtype_name}: mergekit linear {mk['seconds']:.2f} s (runs {mk['all_seconds']}), "
                  f"peak RSS {mk['max_rss'] / 2**30:.2f} GiB")
            row["max_rel_diff"] = compare_outputs(out_glue, out_mk, dtype_name)
        rows.append(row)
        for p in experts:
            shutil.rmtree(p, ignore_errors=True)
    print("\n| dtype | hf-glue s | mergekit s | time ratio | hf-glue peak RSS | mergekit peak RSS | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g, m = r["hf-glue"], r.get("mergekit")
        if m:
            print(f"| {r['dtype']} | {g['seconds']:.2f} | {m['seconds']:.2f} | {g['seconds'] / m['seconds']:.2f} | "
                  f"{g['max_rss'] / 2**30:.2f} GiB | {m['max_rss'] / 2**30:.2f} GiB | {g['max_rss'] / m['max_rss']:.2f} |")
        else:
            print(f"| {r['dtype']} | {g['seconds']:.2f} | – | – | {g['max_rss'] / 2**30:.2f} GiB | – | – |")
    print("Targets: time ratio ≤ 0.5, RSS ratio ≤ 0.75 (hf-glue / mergekit).")


if __name__ == "__main__":
    main()
