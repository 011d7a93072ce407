"""Check that hf-glue's task vectors reproduce mergekit's ``ties`` and ``task_arithmetic`` merges, tensor by tensor.

The script builds a tiny Llama base (hidden size 32, 2 layers) and three experts fine-tuned from it in spirit
(base + seeded noise; the third leaves the norms untouched, so some deltas are exactly 0), merges them with
mergekit's ``mergekit-yaml`` (hand-set weights, ``normalize: false``, float32), computes
θ = θ_base + Σ_k w_k τ̂_k with hf-glue's engine (``ExpertMatrix.from_task_vectors``, the path of ``merge
--combine``), and prints the largest
absolute difference per method, exiting 1 if a tensor differs by more than ``--tolerance`` or is missing.

mergekit goes in a throw-away virtual environment outside the repository (it reuses this Python's torch and
transformers; mergekit 0.1.5 accepts transformers 5)::

    python -m venv /tmp/mk-venv --system-site-packages
    /tmp/mk-venv/bin/pip install mergekit==0.1.5
    python scripts/check_mergekit.py --mergekit-python /tmp/mk-venv/bin/python

Without ``--mergekit-python`` the ``mergekit-yaml`` found on PATH is used. DARE is not compared: mergekit draws
its drop mask from the global RNG, so only its distribution can match.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


#: mergekit's method name -> hf-glue's.
METHODS = {"ties": "ties", "task_arithmetic": "task-arithmetic"}


def build_models(root: Path, n_experts: int, noise: float) -> tuple[Path, list[Path]]:
    """A tiny random Llama base and ``n_experts`` perturbed copies, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    base_path = root / "base"
    model.save_pretrained(base_path, safe_serialization=True)
    expert_paths = []
    for k in range(n_experts):
        gen = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                step = noise * torch.randn(tensor.shape, generator=gen)
                if k == n_experts - 1 and "norm" in name:
                    step.zero_()
                tensor.copy_(base_state[name] + step)
        path = root / f"expert-{k}"
        model.save_pretrained(path, safe_serialization=True)
        expert_paths.append(path)
    return base_path, expert_paths


def mergekit_command(parser: argparse.ArgumentParser, python: str | None) -> list[str]:
    """How to run ``mergekit-yaml``: with ``--mergekit-python``'s interpreter, else from PATH."""
    if python:
        return [python, "-m", "mergekit.scripts.run_yaml"]
    if shutil.which("mergekit-yaml"):
        return [shutil.which("mergekit-yaml")]
    parser.error("mergekit-yaml is not on PATH: pass --mergekit-python (see this script's docstring)")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise SystemExit(f"no .safetensors files in {path}")
    return state


def run_mergekit(command: list[str], method: str, base: Path, experts: list[Path], weights: list[float],
                 density: float, out: Path) -> dict[str, torch.Tensor]:
    models = []
    for path, weight in zip(experts, weights):
        parameters = {"weight": weight}
        if method != "task_arithmetic":
            parameters["density"] = density
        models.append({"model": str(path), "parameters": parameters})
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    config_path = out.with_suffix(".yml")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = [*command, str(config_path), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    print("$", " ".join(args), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"mergekit failed on {method} (exit {done.returncode})")
    return load_state(out)


def merge_here(method: str, base: Path, experts: list[Path], weights: list[float], density: float
               ) -> dict[str, torch.Tensor]:
    """θ = θ_base + Σ_k w_k τ̂_k through hf-glue's own engine (the path `merge --combine` takes): the experts'
    task vectors processed into `ExpertMatrix.from_task_vectors`, then the exact blend for ``weights``."""
    from hf_glue.engine.matrix import ExpertMatrix
    from hf_glue.io.experts import fetch_weights, resolve_experts

    loaded = resolve_experts([str(p) for p in [*experts, base]], minimum=1)
    fetch_weights(loaded)
    matrix = ExpertMatrix.from_task_vectors(loaded[:-1], loaded[-1], METHODS[method], density=density,
                                            weights=weights, seed=0)
    return matrix.materialize(torch.tensor([weights], dtype=torch.float64))


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, list[str]]:
    problems = [f"missing in mergekit's output: {name}" for name in sorted(ours.keys() - theirs.keys())]
    problems += [f"only in mergekit's output: {name}" for name in sorted(theirs.keys() - ours.keys())]
    worst = 0.0
    for name in sorted(ours.keys() & theirs.keys()):
        if ours[name].shape != theirs[name].shape:
            problems.append(f"{name}: shape {tuple(ours[name].shape)} vs {tuple(theirs[name].shape)}")
            continue
        worst = max(worst, (ours[name] - theirs[name].float()).abs().max().item())
    return worst, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit-python", help="Python of a venv with mergekit (default: mergekit-yaml on PATH)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--weights", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.02, help="std of each expert's delta from the base")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--workdir", help="keep the models and merges here (default: a temporary folder)")
    args = parser.parse_args(argv)

    command = mergekit_command(parser, args.mergekit_python)

    with tempfile.TemporaryDirectory(prefix="hf-glue-mergekit-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        base_path, expert_paths = build_models(root, len(args.weights), args.noise)
        failed = False
        for method in args.methods:
            theirs = run_mergekit(command, method, base_path, expert_paths, args.weights, args.density,
                                  root / f"merged-{method}")
            ours = merge_here(method, base_path, expert_paths, args.weights, args.density)
            worst, problems = compare(ours, theirs)
            verdict = "OK" if worst <= args.tolerance and not problems else "MISMATCH"
            print(f"{method}: {len(ours)} tensors, weights {args.weights}, density {args.density}, "
                  f"max |hf-glue - mergekit| = {worst:.3e} -> {verdict}")
            for problem in problems:
                print("  " + problem)
            failed |= verdict != "OK"
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
