"""The comparison report of `hf-glue compare`: summary statistics, the printed table, the card table, the chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional


PEAK_COLUMN = "+peak MB"
PEAK_NOTE = (f"{PEAK_COLUMN}: the method's own peak memory above what the process held when it started (the loaded "
             "experts): CUDA allocations on GPU, resident memory on CPU.")


def _stats(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def build_report(prep, runs: list[dict], labels: list[str], seeds: list[int], finetuning: bool) -> dict:
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
            "validation_passes": mine[0].get("validation_passes", 0),
            "backward_passes": mine[0]["backward_passes"],
            "seconds": statistics.fmean(r["seconds"] for r in mine),
            # the method's own peak above the memory held when it started (the loaded experts); max over seeds
            "peak_memory_bytes": max((r["peak_memory_bytes"] for r in mine if r.get("peak_memory_bytes") is not None),
                                     default=None),
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
    columns += ["forward", "backward", "seconds", PEAK_COLUMN]
    rows = []
    for s in report["summary"]:
        row = [" ".join(f"{v:.2f}" for v in s["coefficients"].values()) or "–", _fmt(s["merged"].get(metric)),
               _fmt(s["merged"].get("loss"))]
        if finetuned:
            row.append(_fmt((s["finetuned"] or {}).get(metric)))
        peak = s["peak_memory_bytes"]
        row += [str(s["forward_passes"]), str(s["backward_passes"]), f"{s['seconds']:.2f}",
                "–" if peak is None else f"{peak / 2**20:.1f}"]
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
    table = [line(r).rstrip() for r in [header, ["-" * w for w in widths]] + rows]
    return "\n".join([title] + table + [PEAK_NOTE])


def _card_table(report: dict) -> dict:
    columns, rows = _rows(report)
    return {"columns": columns, "rows": [{"method": r[0], **dict(zip(columns, r[1:]))} for r in rows],
            "note": PEAK_NOTE}


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
    ax.set_xticklabels([s["method"].replace(": ", ":\n", 1) if s["method"].startswith(("expert: ", "task vector: "))
                        else s["method"] for s in summary], fontsize=8)
    ax.set_ylabel(metric)
    seeds = report["seeds"]
    ax.set_title(f"Target {metric} on {report['dataset']['id']} (mean ± std over {len(seeds)} seed(s))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
