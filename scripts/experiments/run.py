"""Reproduce a table of docs/results.md: build a real expert set, then run `hf-glue compare` on it per seed and budget.

    python scripts/experiments/run.py text|images|label-skew|speech [--quick] [--seeds 0 1 2 3 4]

1. The setup's base model is made (MiniLM from its package, or a small ConvNeXt pretrained on Fashion-MNIST) and each expert
   fine-tuned from it on its domain; base and experts are published into a local Hugging Face cache
   (WORKDIR/hub) as ``exp/<setup>-<name>``, so `hf-glue` resolves them by repo id with HF_HUB_OFFLINE=1.
2. For every seed and budget, the target's rows for that seed (a seeded sample of the budget's size; all rows,
   reordered, when the budget is the whole train split) are
   published as a dataset, and `hf-glue compare` runs every method on it — the users' own path — once at model
   granularity (with the base as a --baselines start and every expert alone) and once for GLUE at block
   granularity (``--runs`` picks the compares: ``auto``, ``probe`` and ``bf16`` add GLUE alone with
   ``--granularity auto``, ``--select probe`` or bfloat16 experts). Built models and finished compare outputs are
   reused when the command is run again.
3. report.py turns the compare.json files into the tables and the time-to-accuracy plot (WORKDIR/report/).

With ``--combine ties|dare|dare-ties|task-arithmetic`` (one or more) the experts are merged as task vectors over the
setup's base instead: every compare gets ``--base-model exp/<setup>-base --combine METHOD --density D``, runs at model
granularity only, without fine-tuning (``--finetune-epochs 0``) and without ``--baselines`` (the base is λ = 0),
and writes under WORKDIR/runs-combine-<method>[-d<density>]/ so the simplex results in WORKDIR/runs/ are untouched;
the table (WORKDIR/report-combine/) sets the learned λ beside uniform λ = 1/K and, where WORKDIR/runs/ has them, the
plain (simplex) GLUE merge and the best single expert of the same seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402
import report  # noqa: E402
from setups import SETUPS, Budget, Setup  # noqa: E402

METHODS = ["glue", "uniform", "data-size", "proxy", "full-gradient", "cma", "nevergrad"]
QUICK_METHODS = ["glue", "uniform", "cma"]
COMBINE_METHODS = ["task-arithmetic", "ties", "dare", "dare-ties"]
COMBINE_DEFAULT_METHODS = ["glue", "uniform", "cma"]


def combine_runs(workdir: Path, combine: str, density: float, kept: bool = False) -> Path:
    """Where the compare outputs of one --combine setting go (the density is named when it is not the default);
    ``kept``: the copies under --results-dir (``combine-<method>``, beside the simplex runs' budget folders)."""
    return workdir / (("combine-" if kept else "runs-combine-") + combine + ("" if density == 0.5 else f"-d{density:g}"))


def hub_env(workdir: Path) -> dict:
    """The environment that makes repo ids resolve from WORKDIR's cache, offline."""
    return {**os.environ, "HF_HUB_CACHE": str(workdir / "hub"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def build(setup: Setup, workdir: Path, quick: bool) -> dict:
    """Base and experts, trained once and published into WORKDIR/hub; returns their repo ids."""
    from hf_glue.testing import publish_to_cache
    from train import train_model

    models = workdir / "models"
    ids = {"base": f"exp/{setup.name}-base", "experts": [f"exp/{setup.name}-{n}" for n in setup.experts]}
    base = models / "base"
    if not (base / "config.json").is_file():
        print(f"[{setup.name}] making the base model", flush=True)
        setup.make_base(base)
    publish_to_cache(base, ids["base"], workdir / "hub")
    for (name, rows), repo_id in zip(setup.experts.items(), ids["experts"]):
        folder = models / (f"lora-{name}" if setup.lora else name)
        if not (folder / ("adapter_config.json" if setup.lora else "config.json")).is_file():
            from transformers import AutoConfig
            from hf_glue.tasks import detect_task

            start = time.perf_counter()
            task = detect_task(AutoConfig.from_pretrained(base).to_dict(), None)
            model = task.model_class().from_pretrained(base)
            processor = task.load_processor(base)
            if setup.lora:
                import torch
                from peft import LoraConfig, get_peft_model

                torch.manual_seed(0)
                model = get_peft_model(model, LoraConfig(**setup.lora))
            train_model(model, processor, rows, epochs=setup.epochs_for(len(rows)), lr=setup.expert_lr,
                        batch_size=setup.batch_size, seed=0, max_length=setup.max_length)
            tmp = folder.with_name(folder.name + ".tmp")
            model.save_pretrained(tmp)
            copy_processor(base, tmp)
            if setup.lora:  # the adapter names its base by the repo id it is published as
                config = json.loads((tmp / "adapter_config.json").read_text())
                (tmp / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": ids["base"]},
                                                                    indent=2))
            tmp.rename(folder)
            print(f"[{setup.name}] expert {name}: {len(rows)} rows, {time.perf_counter() - start:.0f} s", flush=True)
        publish_to_cache(folder, repo_id, workdir / "hub")
    return ids


def copy_processor(base: Path, folder: Path) -> None:
    """The base's tokenizer / image-processor files, byte for byte (a re-saved tokenizer records the truncation
    it was last used with, and hf-glue rightly refuses experts whose tokenizer files differ)."""

    for f in base.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy2(f, folder / f.name)


#: the compares run.py can run per seed and budget (the folder name under runs/<budget>/seed<S>/), with the options
#: that set each one apart: model runs every method (with the base and every expert alone), the others GLUE alone
RUNS = {
    "model": ["--granularity", "model"],
    "block": ["--granularity", "block"],
    "auto": ["--granularity", "auto"],
    # the probe trains on the search rows: the candidates are scored after it on a quarter held apart
    "probe": ["--granularity", "model", "--select", "probe", "--validation-fraction", "0.25"],
    "bf16": ["--granularity", "model", "--dtype", "bfloat16"],
}
DEFAULT_RUNS = ("model", "block")


def target(setup: Setup, budget: Budget, seed: int, workdir: Path) -> str:
    """Publish the seed's target sample for a budget (train: ``budget.rows`` rows; test: fixed) as a dataset."""
    from hf_glue.testing import publish_to_cache

    folder = workdir / "targets" / f"{budget.name}-s{seed}"
    if not folder.is_dir():
        rows = list(setup.target_pool)
        random.Random(1000 + seed).shuffle(rows)
        data.save_dataset_dict(rows[:budget.rows], setup.target_test, folder)
    repo_id = f"exp/{setup.name}-target-{budget.name}-s{seed}"
    publish_to_cache(folder, repo_id, workdir / "hub", repo_type="dataset")
    return repo_id


def compare(setup: Setup, ids: dict, dataset: str, budget: Budget, seed: int, out: Path, workdir: Path,
            methods: list[str], run: str, quick: bool, combine: str | None = None,
            density: float = 0.5) -> Path:
    """One `hf-glue compare` run (skipped when its compare.json exists); returns its output folder.

    ``combine``: task vectors over the base (``--base-model --combine --density``), no fine-tuning, no baselines."""
    if (out / "compare.json").is_file():
        return out
    epochs = 0 if combine else budget.epochs
    args = ["--experts", *ids["experts"], "--dataset", dataset, "--data-sizes", *map(str, setup.data_sizes),
            "--methods", *methods, *RUNS[run], "--seeds", str(seed),
            "--batch-size", str(min(setup.batch_size, budget.rows)), "--finetune-epochs", str(epochs),
            "--learning-rate", str(setup.finetune_lr), "--cpu", "--output-dir", str(out), *setup.extra_args]
    if quick:
        args += ["--steps", "4", "--proxy-batches", "1"]
    if combine:
        # --seed too: compare draws the DARE mask once, from --seed, for all its --seeds; so each seed its own mask
        args += ["--base-model", ids["base"], "--combine", combine, "--density", f"{density:g}", "--seed", str(seed)]
    elif run == "model":
        if not setup.lora:  # adapters: the base alone is not a start `compare` takes beside them
            args += ["--baselines", ids["base"]]
    else:
        args += ["--no-include-experts"]
    if budget.eval_steps and epochs:
        training_args = out.parent / f"training-args-{run}.json"
        training_args.parent.mkdir(parents=True, exist_ok=True)
        training_args.write_text(json.dumps({"eval_strategy": "steps", "eval_steps": budget.eval_steps}))
        args += ["--training-args", str(training_args)]
    command = [sys.executable, "-m", "hf_glue", "compare", *args]
    print(f"[{setup.name}] {budget.name} seed {seed} {run}{' ' + combine if combine else ''}: hf-glue compare {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, env=hub_env(workdir), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hf-glue compare failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"[{setup.name}]   done in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setup", choices=sorted(SETUPS))
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, one seed: a smoke test of the whole path.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds (default: 0-4; --quick: 0).")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where models, the local hub cache and compare outputs go (default: "
                             "./experiments/<setup>[-quick]); re-running reuses what is there.")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"Methods to compare (default: {' '.join(METHODS)}; --quick: {' '.join(QUICK_METHODS)}).")
    parser.add_argument("--report-only", action="store_true",
                        help="Only tabulate the compare outputs already in WORKDIR (e.g. of an interrupted run, or "
                             "of seeds run in several work folders and copied together); runs nothing.")
    parser.add_argument("--data-cache", type=Path, default=None, help="Where package downloads are kept.")
    parser.add_argument("--combine", nargs="+", choices=COMBINE_METHODS, default=None,
                        help="Merge the experts as task vectors over the setup's base with each of these methods "
                             "(model granularity, no fine-tuning, no --baselines; outputs in "
                             "WORKDIR/runs-combine-<method>/; default methods: "
                             f"{' '.join(COMBINE_DEFAULT_METHODS)}).")
    parser.add_argument("--density", type=float, default=0.5,
                        help="--combine ties/dare/dare-ties: the fraction of each task vector kept (default 0.5).")
    parser.add_argument("--budgets", nargs="+", default=None,
                        help="Only these budgets of the setup, by name (e.g. small; default: all).")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(DEFAULT_RUNS),
                        help="The compares per seed and budget: model (every method, every expert alone and the "
                             "base, at model granularity), then GLUE alone: block (--granularity block), auto "
                             "(--granularity auto), probe (--select probe), bf16 (the experts in bfloat16); default: "
                             "model block.")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="Keep each compare.json here (RESULTS_DIR/<budget>/seed<S>/<run>/, small "
                             "files to commit, e.g. docs/results/<setup>) and the tables as RESULTS_DIR/<setup>.md; "
                             "with --report-only, read the compare outputs from here instead of WORKDIR/runs.")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    workdir = (args.workdir or Path("experiments") / (args.setup + ("-quick" if args.quick else ""))).resolve()
    cache = args.data_cache or data.default_cache()
    os.environ.update({k: v for k, v in hub_env(workdir).items() if k.startswith(("HF_", "TOKENIZERS"))})
    setup = SETUPS[args.setup](cache, args.quick)
    if args.budgets:
        unknown = set(args.budgets) - {b.name for b in setup.budgets}
        if unknown:
            raise SystemExit(f"unknown budget(s) {sorted(unknown)}; {setup.name} has "
                             f"{[b.name for b in setup.budgets]}.")
        setup.budgets = [b for b in setup.budgets if b.name in args.budgets]
    if args.combine:
        return main_combine(args, setup, seeds, workdir)
    methods = args.methods or (QUICK_METHODS if args.quick else setup.methods or METHODS)
    outputs = []
    if args.report_only:
        runs_dir = args.results_dir or workdir / "runs"
        outputs = [(budget, seed, folder) for budget in setup.budgets for seed in seeds
                   for folder in sorted((runs_dir / budget.name / f"seed{seed}").glob("*"))
                   if (folder / "compare.json").is_file()]
        if not outputs:
            raise SystemExit(f"no compare outputs under {runs_dir} for seeds {seeds}.")
        seeds = sorted({seed for _, seed, _ in outputs})
    ids = {} if args.report_only else build(setup, workdir, args.quick)
    for budget in [] if args.report_only else setup.budgets:
        for seed in seeds:
            dataset = target(setup, budget, seed, workdir)
            runs = workdir / "runs" / budget.name / f"seed{seed}"
            for name in ["model"] if args.quick else args.runs:  # --quick: the users' path once
                outputs.append((budget, seed, compare(setup, ids, dataset, budget, seed, runs / name, workdir,
                                                      methods if name == "model" else ["glue"], name, args.quick)))
    if args.results_dir and not args.report_only:
        outputs = [(budget, seed, keep(folder, args.results_dir / budget.name / f"seed{seed}" / folder.name))
                   for budget, seed, folder in outputs]
    # the compares the table holds (with --report-only: every one found)
    kinds = [g for g in RUNS if any(f.name == g for _, _, f in outputs)]
    text = report.write(setup, outputs, seeds, workdir / "report", command=" ".join(
        ["python scripts/experiments/run.py", args.setup] + (["--quick"] if args.quick else [])
        + ["--seeds", *map(str, seeds)] + (["--methods", *args.methods] if args.methods else [])
        + (["--runs", *kinds] if kinds != list(DEFAULT_RUNS) and not args.quick else [])))
    if args.results_dir:
        (args.results_dir / f"{setup.name}.md").write_text(text + "\n")
        plot = workdir / "report" / f"{setup.name}-time-to-accuracy.png"
        if plot.is_file():  # the tables link it by this name
            shutil.copy2(plot, args.results_dir / plot.name)
    print(text)
    if args.quick:
        print("--quick: a few rows and steps, a smoke test of the whole path; its figures say nothing about the "
              "methods (see docs/results.md for the full runs).")
    return 0


def keep(folder: Path, dest: Path) -> Path:
    """Copy a compare output's compare.json (what the tables are made of) to ``dest``; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / "compare.json", dest / "compare.json")
    return dest


def main_combine(args, setup: Setup, seeds: list[int], workdir: Path) -> int:
    """--combine: one model-granularity compare per method, budget and seed, then the task-vector table."""
    methods = args.methods or COMBINE_DEFAULT_METHODS
    outputs = []
    # where the outputs are read from with --report-only (and kept with --results-dir): RESULTS_DIR/combine-<method>/
    kept = args.results_dir or workdir
    if args.report_only:
        outputs = [(combine, budget, seed, folder) for combine in args.combine for budget in setup.budgets
                   for seed in seeds
                   for folder in [combine_runs(kept, combine, args.density, args.results_dir is not None)
                                  / budget.name / f"seed{seed}" / "model"]
                   if (folder / "compare.json").is_file()]
        if not outputs:
            raise SystemExit(f"no --combine compare outputs under {kept} for seeds {seeds}.")
    else:
        ids = build(setup, workdir, args.quick)
        for combine in args.combine:
            for budget in setup.budgets:
                for seed in seeds:
                    dataset = target(setup, budget, seed, workdir)
                    out = combine_runs(workdir, combine, args.density) / budget.name / f"seed{seed}" / "model"
                    outputs.append((combine, budget, seed, compare(setup, ids, dataset, budget, seed, out, workdir,
                                                                   methods, "model", args.quick, combine=combine,
                                                                   density=args.density)))
    if args.results_dir and not args.report_only:
        outputs = [(combine, budget, seed,
                    keep(folder, combine_runs(args.results_dir, combine, args.density, True) / budget.name
                         / f"seed{seed}" / "model")) for combine, budget, seed, folder in outputs]
    runs_dir = args.results_dir or workdir / "runs"
    references = [(budget, seed, folder) for budget in setup.budgets for seed in seeds
                  for folder in [runs_dir / budget.name / f"seed{seed}" / "model"]
                  if (folder / "compare.json").is_file()]
    command = " ".join(["python scripts/experiments/run.py", args.setup] + (["--quick"] if args.quick else [])
                       + ["--seeds", *map(str, seeds), "--combine", *args.combine]
                       + ([] if args.density == 0.5 else ["--density", f"{args.density:g}"])
                       + (["--budgets", *args.budgets] if args.budgets else [])
                       + (["--methods", *args.methods] if args.methods else []))
    text = report.write_combine(setup, outputs, references, workdir / "report-combine", command=command,
                                density=args.density)
    if args.results_dir:
        suffix = "" if args.density == 0.5 else f"-d{args.density:g}"
        (args.results_dir / f"{setup.name}-combine{suffix}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
