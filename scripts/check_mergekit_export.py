"""Check that the ``mergekit_config.yml`` hf-glue writes beside a merge reproduces the merge with mergekit.

The script builds the tiny Llama base and experts of ``check_mergekit.py`` (hidden size 32, 2 layers; each
expert the base plus seeded noise), adds a word-level tokenizer and a causal-LM target dataset
(``hf_glue.testing``), and runs real hf-glue merges into output folders:

- ``model``: GLUE, one α per expert (``merge_method: linear``);
- ``block``: GLUE with ``--granularity block`` (per-tensor weights with ``filter`` lists);
- ``ties``: ``--combine ties --method weights`` with hand-set λ (``merge_method: ties``, exact because the sign
  election uses those weights; a learned λ elects with the search's start and says so in the file);
- ``lora``: GLUE over three PEFT LoRA adapters of the base (random, non-zero factors on q/v projections), saved
  merged (``merge_method: linear`` over ``base+adapter`` models).

For each it runs ``mergekit-yaml`` on the exported ``mergekit_config.yml`` as written (local paths) and compares
every tensor of mergekit's output with hf-glue's saved ``model.safetensors``, printing the largest absolute
difference; exit 1 if one exceeds ``--tolerance`` (1e-6) or a tensor is missing on either side.

mergekit goes in a throw-away virtual environment (see ``check_mergekit.py``)::

    python scripts/check_mergekit_export.py --mergekit-python /tmp/mk-venv/bin/python
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_mergekit import build_models, compare, load_state, mergekit_command  # noqa: E402

#: name → (options of GlueConfig, whether the experts' task vectors over the base are merged)
CONFIGS = {
    "model": dict(steps=6),
    "block": dict(steps=6, granularity="block"),
    "ties": dict(method="weights", weights=[0.7, 0.5, 0.3], combine="ties", density=0.5),
    "lora": dict(steps=6),
}


def prepare(root: Path, noise: float) -> tuple[Path, list[Path], Path]:
    """The tiny Llama base and experts with a tokenizer each, and a causal-LM target dataset."""
    from hf_glue import testing

    base, experts = build_models(root, 3, noise)
    tokenizer = testing.make_tokenizer([f"t{i}" for i in range(testing.LM_SYMBOLS)])
    for folder in (base, *experts):
        tokenizer.save_pretrained(folder)
    data = testing.write_dataset(root / "target", "causal-lm", domain=0, n_train=64, n_test=32)
    return base, experts, data


def make_adapters(root: Path, base: Path, n: int = 3) -> list[Path]:
    """``n`` PEFT LoRA adapters of the tiny Llama base with random (non-zero) factors, as trained adapters have."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for k in range(n):
        torch.manual_seed(100 + k)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        path = root / f"lora-{k}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def run_mergekit(command: list[str], config: Path, out: Path) -> None:
    args = [*command, str(config), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
            "--lora-merge-cache", str(out.with_name(out.name + "-lora-cache"))]
    print("$", " ".join(args), flush=True)
    done = subprocess.run(args, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"mergekit failed on {config} (exit {done.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit-python", help="Python of a venv with mergekit (default: mergekit-yaml on PATH)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--noise", type=float, default=0.02, help="std of each expert's delta from the base")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--workdir", help="keep the models and merges here (default: a temporary folder)")
    parser.add_argument("--show-config", action="store_true", help="print each exported mergekit_config.yml")
    args = parser.parse_args(argv)
    command = mergekit_command(parser, args.mergekit_python)

    from hf_glue import GlueConfig, merge_experts
    from hf_glue.config import ExpertsConfig

    with tempfile.TemporaryDirectory(prefix="hf-glue-mergekit-export-") as scratch:
        root = Path(args.workdir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        base, experts, data = prepare(root, args.noise)
        failed = False
        for name in args.configs:
            options = dict(CONFIGS[name])
            combine = options.get("combine")
            out = root / f"hf-glue-{name}"
            shutil.rmtree(out, ignore_errors=True)
            sources = make_adapters(root, base) if name == "lora" else experts
            merge_experts([str(p) for p in sources], str(data), GlueConfig(**options), output_dir=str(out),
                          experts_config=ExpertsConfig(base_model=str(base)) if combine else None)
            config = out / "mergekit_config.yml"
            if args.show_config:
                print(config.read_text())
            theirs_dir = root / f"mergekit-{name}"
            shutil.rmtree(theirs_dir, ignore_errors=True)
            run_mergekit(command, config, theirs_dir)
            ours, theirs = load_state(out), load_state(theirs_dir)
            worst, problems = compare(ours, theirs)
            verdict = "OK" if worst <= args.tolerance and not problems else "MISMATCH"
            method = next(line for line in config.read_text().splitlines() if line.startswith("merge_method:"))
            print(f"{name}: {method}, {len(ours)} tensors, max |hf-glue - mergekit| = {worst:.3e} -> {verdict}",
                  flush=True)
            for problem in problems:
                print("  " + problem)
            failed |= verdict != "OK"
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
