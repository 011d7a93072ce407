"""`hf-glue compare`: every method (and every expert alone) on the same resolved inputs, one table.

The experts and target data are resolved, validated and loaded once; each method then learns α, its blend is
evaluated on the held-out split and, with --finetune-epochs, fine-tuned and evaluated again.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .config import CompareConfig, DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig
from .errors import GlueError
from .methods import MethodOutput, get_method
from .methods.base import peak_memory_bytes, reset_peak_memory

DEFAULT_METHODS = CompareConfig().methods


def _methods(glue: GlueConfig, compare: CompareConfig) -> list[str]:
    for name in compare.methods:
        get_method(name)
    methods = list(dict.fromkeys(compare.methods))
    if "data-size" in methods and not glue.data_sizes:
        if compare.methods != DEFAULT_METHODS:
            raise GlueError("method data-size needs the experts' training-set sizes: pass --data-sizes n1 n2 ...")
        methods.remove("data-size")
        print("note: data-size weighting skipped (no --data-sizes given).")
    return methods


def run_compare(
    experts_config: ExpertsConfig,
    data_config: DataConfig,
    glue_config: GlueConfig,
    finetune_config: FinetuneConfig,
    compare_config: CompareConfig,
) -> dict:
    """Run the comparison, print the table, write ``compare.json`` and ``compare.png``; returns the report."""
    from .finetune import read_training_args
    from .pipeline import blended_model, finetune_result, prepare, run_method, to_result

    methods = _methods(glue_config, compare_config)
    read_training_args(finetune_config.training_args)
    out_dir = Path(compare_config.output_dir)
    prep = prepare(experts_config, data_config, glue_config)
    finetuning = finetune_config.finetune_epochs > 0
    entries = [(m, m) for m in methods]
    if compare_config.include_experts:
        entries += [(f"expert: {name}", k) for k, name in enumerate(prep.matrix.expert_names)]
    runs = []
    for label, what in entries:
        seeded = finetuning or (isinstance(what, str) and what in ("glue", "full-gradient"))
        for seed in compare_config.seeds if seeded else compare_config.seeds[:1]:
            config = replace(glue_config, method=what if isinstance(what, str) else "uniform", seed=seed)
            out = run_method(prep, config) if isinstance(what, str) else _one_hot(prep, what)
            result = to_result(prep, config, out)
            if finetuning:
                result.model = blended_model(prep, result.alpha)
                finetune_result(prep, result, finetune_config, seed)
            runs.append({
                "method": label,
                "seed": seed,
                "coefficients": result.coefficients,
                "merged": result.eval,
                "finetuned": result.eval_after,
                "forward_passes": result.forward_passes,
                "backward_passes": result.backward_passes,
                "seconds": result.seconds,
                "peak_memory_bytes": result.peak_memory_bytes,
            })
    report = _report(prep, runs, [label for label, _ in entries], compare_config.seeds, finetuning)
    if prep.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_comparison(report, out_dir / "compare.png")
        print(format_table(report))
        print(f"Wrote {out_dir / 'compare.json'} and {out_dir / 'compare.png'}")
    return report


def _one_hot(prep, k: int) -> MethodOutput:
    alpha = torch.zeros(prep.matrix.num_groups, prep.matrix.num_experts, dtype=torch.float64)
    alpha[:, k] = 1.0
    reset_peak_memory(prep.matrix.device)
    return MethodOutput(alpha=alpha, peak_memory_bytes=peak_memory_bytes(prep.matrix.device))


def _stats(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _report(prep, runs: list[dict], labels: list[str], seeds: list[int], finetuning: bool) -> dict:
    metric = prep.task.primary_metric
    summary = []
    for label in labels:
        mine = [r for r in runs if r["method"] == label]
        names = list(mine[0]["coefficients"])
        summary.append({
            "method": label,
            "coefficients": {n: statistics.fmean(r["coefficients"][n] for r in mine) for n in names},
            "merged": {m: _stats([r["merged"][m] for r in mine]) for m in mine[0]["merged"]},
            "finetuned": ({m: _stats([r["finetuned"][m] for r in mine]) for m in mine[0]["finetuned"]}
                          if finetuning else None),
            "forward_passes": mine[0]["forward_passes"],
            "backward_passes": mine[0]["backward_passes"],
            "seconds": statistics.fmean(r["seconds"] for r in mine),
            "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in mine) or None,
        })
    report = {
        "task": prep.task.name,
        "metric": metric,
        "greater_is_better": prep.task.greater_is_better,
        "experts": [e.name for e in prep.experts],
        "dataset": prep.target.to_dict(),
        "seeds": seeds,
        "summary": summary,
        "runs": runs,
    }
    report["card"] = _card_table(report)
    return report


def _fmt(stat: Optional[dict]) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if stat["n"] > 1 else f"{stat['mean']:.4f}"


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    metric = report["metric"]
    finetuned = any(s["finetuned"] for s in report["summary"])
    columns = ["coefficients", f"{metric} (merged)", "loss (merged)"]
    columns += [f"{metric} (fine-tuned)"] if finetuned else []
    columns += ["forward", "backward", "seconds", "peak MB"]
    rows = []
    for s in report["summary"]:
        row = [" ".join(f"{v:.2f}" for v in s["coefficients"].values()), _fmt(s["merged"].get(metric)),
               _fmt(s["merged"].get("loss"))]
        if finetuned:
            row.append(_fmt((s["finetuned"] or {}).get(metric)))
        peak = s["peak_memory_bytes"]
        row += [str(s["forward_passes"]), str(s["backward_passes"]), f"{s['seconds']:.2f}",
                f"{peak / 2**20:.0f}" if peak else "–"]
        rows.append([s["method"]] + row)
    return columns, rows


def format_table(report: dict) -> str:
    """The comparison as an aligned plain-text table (coefficients in --experts order)."""
    columns, rows = _rows(report)
    header = ["method"] + columns
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    title = (f"Target {report['metric']} ({'higher' if report['greater_is_better'] else 'lower'} is better) "
             f"on {report['dataset']['id']} [{report['dataset']['eval_split']}]; coefficients: "
             f"{', '.join(report['experts'])}")
    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _card_table(report: dict) -> dict:
    columns, rows = _rows(report)
    return {"columns": columns, "rows": [{"method": r[0], **dict(zip(columns, r[1:]))} for r in rows]}


def plot_comparison(report: dict, path: Path) -> Path:
    """Bars of the target metric per method (merged, and fine-tuned when run), with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    summary = report["summary"]
    stages = [("merged", "merged")] + ([("finetuned", "fine-tuned")] if any(s["finetuned"] for s in summary) else [])
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(summary) + 2), 4.2))
    for i, (key, label) in enumerate(stages):
        means = [((s[key] or {}).get(metric) or {}).get("mean", float("nan")) for s in summary]
        stds = [((s[key] or {}).get(metric) or {}).get("std", 0.0) for s in summary]
        xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(summary))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([s["method"].replace("expert: ", "expert:\n") for s in summary], fontsize=8)
    ax.set_ylabel(metric)
    seeds = report["seeds"]
    ax.set_title(f"Target {metric} on {report['dataset']['id']} (mean ± std over {len(seeds)} seed(s))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
