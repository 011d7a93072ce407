"""Tables and the time-to-accuracy plot of one setup, from its `hf-glue compare` outputs (docs/results.md)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

METRIC = "accuracy"
ORDER = ["base model", "best single expert", "uniform", "data-size", "proxy", "full-gradient", "cma", "nevergrad",
         "GLUE (model)", "GLUE (block)"]


def _label(method: str, granularity: str, experts_prefix: str) -> str:
    if method.startswith("model: "):
        return "base model"
    if method.startswith("expert: "):
        return "expert " + method[len("expert: " + experts_prefix):]
    if method == "glue":
        return f"GLUE ({granularity})"
    return method


def collect(outputs: list, prefix: str) -> dict:
    """{budget: {label: [run, ...]}} over seeds, each run a compare.json run with its curve and costs."""
    table: dict = {}
    for budget, seed, folder in outputs:
        granularity = folder.name
        report = json.loads((folder / "compare.json").read_text())
        for run in report["runs"]:
            label = _label(run["method"], granularity, prefix)
            table.setdefault(budget.name, {}).setdefault(label, []).append({**run, "seed": seed, "budget": budget})
    return table


def _stat(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _mean(runs: list[dict], stage: str) -> float:
    return statistics.fmean(r[stage][METRIC] for r in runs if r.get(stage))


def _curve(run: dict) -> list[tuple[int, float]]:
    """(fine-tuning step, held-out accuracy): the start, each evaluation during training, the end."""
    points = [(0, run["merged"][METRIC])] + [(p["step"], p[METRIC]) for p in run.get("finetune_curve") or []]
    return points


def steps_to(run: dict, threshold: float) -> int | None:
    """The first fine-tuning step at which the start reaches ``threshold`` (None: never, within the budget)."""
    for step, acc in _curve(run):
        if acc >= threshold - 1e-9:
            return step
    return None


def write(setup, outputs: list, seeds: list[int], folder: Path, command: str) -> str:
    """Write ``<setup>.md`` (tables), ``<setup>.json`` and ``<setup>-time-to-accuracy.png``; returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    table = collect(outputs, f"exp/{setup.name}-")
    lines = [f"### {setup.name}", "", setup.describe + ".", "", f"Command: `{command}`", ""]
    summary: dict = {}
    for budget in setup.budgets:
        runs = table.get(budget.name, {})
        experts = {k: v for k, v in runs.items() if k.startswith("expert ")}
        best = max(experts, key=lambda k: _mean(experts[k], "merged")) if experts else None
        labels = {**runs, **({"best single expert": experts[best]} if best else {})}
        names = [n for n in ORDER if n in labels] + sorted(experts)
        lines += [f"**Budget {budget.name}**: {budget.rows} target rows for the search and for fine-tuning, "
                  f"{budget.epochs:g} epoch(s); held-out {METRIC} (%) over seeds {seeds}, mean ± std."
                  + (f" Best single expert: {best[len('expert '):]}, chosen by its merged mean." if best else ""), "",
                  f"| start | merged | fine-tuned | forward passes | backward passes | search seconds |",
                  "|---|---|---|---|---|---|"]
        summary[budget.name] = {}
        for name in names:
            rs = labels[name]
            merged = [r["merged"][METRIC] for r in rs]
            tuned = [r["finetuned"][METRIC] for r in rs if r.get("finetuned")]
            seconds = statistics.fmean(r["seconds"] for r in rs)
            lines.append(f"| {name} | {_stat(merged)} | {_stat(tuned)} | {rs[0]['forward_passes']} | "
                         f"{rs[0]['backward_passes']} | {seconds:.1f} |")
            summary[budget.name][name] = {"merged": merged, "finetuned": tuned, "seconds": seconds,
                                          "forward_passes": rs[0]["forward_passes"],
                                          "coefficients": [r["coefficients"] for r in rs]}
        lines.append("")
        if budget.eval_steps and best:
            threshold = _mean(experts[best], "finetuned")
            lines += [f"Fine-tuning steps until each start reaches the best single expert's final fine-tuned "
                      f"{METRIC} ({100 * threshold:.1f} %), evaluated every {budget.eval_steps} steps "
                      "(mean over the seeds that reach it; reached / seeds):", "",
                      "| start | steps | reached |", "|---|---|---|"]
            for name in [n for n in ORDER if n in labels]:
                hits = [s for s in (steps_to(r, threshold) for r in labels[name]) if s is not None]
                lines.append(f"| {name} | {statistics.fmean(hits):.0f} | {len(hits)}/{len(labels[name])} |"
                             if hits else f"| {name} | not reached | 0/{len(labels[name])} |")
                summary[budget.name][name]["steps_to_best_expert"] = hits
            lines.append("")
            _plot(labels, [n for n in ORDER if n in labels], threshold, setup.name, budget,
                  folder / f"{setup.name}-time-to-accuracy.png")
            lines += [f"![time to accuracy]({setup.name}-time-to-accuracy.png)", ""]
    text = "\n".join(lines)
    (folder / f"{setup.name}.md").write_text(text)
    (folder / f"{setup.name}.json").write_text(json.dumps(summary, indent=1))
    return text


def _plot(labels: dict, names: list[str], threshold: float, setup: str, budget, path: Path) -> None:
    """Mean held-out accuracy against fine-tuning steps for each start, with the best expert's final level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        curves = [_curve(r) for r in labels[name]]
        steps = [s for s, _ in curves[0]]
        means = [statistics.fmean(c[i][1] for c in curves if len(c) > i) for i in range(len(steps))]
        style = "-" if name.startswith("GLUE") else "--"
        ax.plot(steps, [100 * m for m in means], style, marker="o", markersize=3, label=name)
    ax.axhline(100 * threshold, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{setup}: accuracy during fine-tuning ({budget.rows} rows, {budget.epochs:g} epochs)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
