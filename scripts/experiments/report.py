"""Tables and the time-to-accuracy plot of one setup, from its `hf-glue compare` outputs (docs/results.md)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Metric:
    """How a setup's held-out metric reads: its key in compare.json, shown in % or as is, and which way is better."""

    key: str
    percent: bool
    higher_is_better: bool

    def show(self, value: float) -> float:
        return 100 * value if self.percent else value

    @property
    def heading(self) -> str:
        return f"{self.key} (%)" if self.percent else f"{self.key} ({'higher' if self.higher_is_better else 'lower'} is better)"

    @property
    def points(self) -> str:
        return " pts" if self.percent else ""

    def goodness(self, value: float) -> float:
        """The value turned so that larger is better (for picking the best and for rank correlations)."""
        return value if self.higher_is_better else -value


METRICS = {"accuracy": Metric("accuracy", True, True), "perplexity": Metric("perplexity", False, False)}
ORDER = ["base model", "best single expert", "uniform", "data-size", "proxy", "full-gradient", "cma", "nevergrad",
         "GLUE (model)", "GLUE (block)", "GLUE (auto)", "GLUE (probe)", "GLUE (bf16)"]


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


def _stat(values: list[float], metric: Metric = METRICS["accuracy"]) -> str:
    if not values:
        return "–"
    mean = metric.show(statistics.fmean(values))
    std = metric.show(statistics.stdev(values)) if len(values) > 1 else 0.0
    digits = 1 if metric.percent or abs(mean) >= 10 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _mean(runs: list[dict], stage: str, metric: Metric) -> float:
    return statistics.fmean(r[stage][metric.key] for r in runs if r.get(stage))


def _curve(run: dict, metric: Metric) -> list[tuple[int, float]]:
    """(fine-tuning step, held-out metric): the start, each evaluation during training, the end."""
    points = [(0, run["merged"][metric.key])] + [(p["step"], p[metric.key]) for p in run.get("finetune_curve") or []]
    return points


def steps_to(run: dict, threshold: float, metric: Metric = METRICS["accuracy"]) -> int | None:
    """The first fine-tuning step at which the start reaches ``threshold`` (None: never, within the budget)."""
    for step, value in _curve(run, metric):
        if metric.goodness(value) >= metric.goodness(threshold) - 1e-9:
            return step
    return None


def write(setup, outputs: list, seeds: list[int], folder: Path, command: str) -> str:
    """Write ``<setup>.md`` (tables), ``<setup>.json`` and ``<setup>-time-to-accuracy.png``; returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    metric = METRICS[setup.metric]
    table = collect(outputs, f"exp/{setup.name}-")
    lines = [f"### {setup.name}", "", setup.describe + ".", "", f"Command: `{command}`", ""]
    summary: dict = {}
    for budget in setup.budgets:
        runs = table.get(budget.name, {})
        if not runs:
            continue
        budget_seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
        experts = {k: v for k, v in runs.items() if k.startswith("expert ")}
        best = max(experts, key=lambda k: metric.goodness(_mean(experts[k], "merged", metric))) if experts else None
        labels = {**runs, **({"best single expert": experts[best]} if best else {})}
        names = [n for n in ORDER if n in labels] + sorted(experts)
        everything = budget.rows >= len(setup.target_pool)
        lines += [f"**Budget {budget.name}**: {budget.rows} target rows for the search and for fine-tuning "
                  + ("(the whole train split: the seeds vary the search and the fine-tuning, not the rows)"
                     if everything else "(a different sample for each seed)")
                  + f", {budget.epochs:g} epoch(s); held-out {metric.heading} over seeds {budget_seeds}, mean ± std."
                  + (f" Best single expert: {best[len('expert '):]}, chosen by its merged mean on the test split "
                     "(an oracle choice; `proxy` chooses from the target's train rows)." if best else ""), "",
                  "| start | merged | fine-tuned | forward passes | backward passes | search seconds |",
                  "|---|---|---|---|---|---|"]
        summary[budget.name] = {}
        for name in names:
            rs = labels[name]
            merged = [r["merged"][metric.key] for r in rs]
            tuned = [r["finetuned"][metric.key] for r in rs if r.get("finetuned")]
            seconds = statistics.fmean(r["seconds"] for r in rs)
            lines.append(f"| {name} | {_stat(merged, metric)} | {_stat(tuned, metric)} | {rs[0]['forward_passes']} | "
                         f"{rs[0]['backward_passes']} | {seconds:.1f} |")
            summary[budget.name][name] = {"merged": merged, "finetuned": tuned, "seconds": seconds,
                                          "forward_passes": rs[0]["forward_passes"],
                                          "coefficients": [r["coefficients"] for r in rs]}
        lines.append("")
        lines += _regime(labels, [n for n in ORDER if n in labels and n != "base model"], budget, summary, metric)
        if budget.eval_steps and best:
            threshold = _mean(experts[best], "finetuned", metric)
            lines += [f"Fine-tuning steps until each start reaches the best single expert's final fine-tuned "
                      f"{metric.key} ({_stat([threshold], metric).split(' ±')[0]}{' %' if metric.percent else ''}), evaluated every {budget.eval_steps} steps "
                      "(mean over the seeds that reach it; reached / seeds):", "",
                      "| start | steps | reached |", "|---|---|---|"]
            for name in [n for n in ORDER if n in labels]:
                hits = [s for s in (steps_to(r, threshold, metric) for r in labels[name]) if s is not None]
                lines.append(f"| {name} | {statistics.fmean(hits):.0f} | {len(hits)}/{len(labels[name])} |"
                             if hits else f"| {name} | not reached | 0/{len(labels[name])} |")
                summary[budget.name][name]["steps_to_best_expert"] = hits
            lines.append("")
            _plot(labels, [n for n in ORDER if n in labels], threshold, setup.name, budget, metric,
                  folder / f"{setup.name}-time-to-accuracy.png")
            lines += [f"![time to accuracy]({setup.name}-time-to-accuracy.png)", ""]
    text = "\n".join(lines)
    (folder / f"{setup.name}.md").write_text(text)
    (folder / f"{setup.name}.json").write_text(json.dumps(summary, indent=1))
    return text


def _spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (average ranks for ties) of two equal-length lists."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else float("nan")  # a constant list has no ranking


def _regime(labels: dict, names: list[str], budget, summary: dict, metric: Metric) -> list[str]:
    """Does the start matter at this budget, and what predicts the fine-tuned result? Per seed, across the starts
    (every method and expert, not the base): the spread of accuracy merged and fine-tuned, and the rank correlation
    of the fine-tuned accuracy with the merged loss (negated), the merged accuracy and, when the Trainer evaluated
    during fine-tuning, the accuracy at its first evaluation (a cheap probe: a few target steps from each start)."""
    starts = [n for n in names if n != "best single expert"] + [n for n in labels if n.startswith("expert ")]
    seeds = sorted({r["seed"] for n in starts for r in labels[n]})
    spread_m, spread_f, rho = [], [], {"merged loss": [], "merged accuracy": [], "probe accuracy": []}
    for seed in seeds:
        runs = [r for n in starts for r in labels[n] if r["seed"] == seed and r.get("finetuned")]
        if len(runs) < 3:
            continue
        final = [metric.goodness(r["finetuned"][metric.key]) for r in runs]
        merged = [metric.goodness(r["merged"][metric.key]) for r in runs]
        spread_m.append(metric.show(max(merged) - min(merged)))
        spread_f.append(metric.show(max(final) - min(final)))
        rho["merged loss"].append(_spearman([-r["merged"]["loss"] for r in runs], final))
        rho["merged accuracy"].append(_spearman(merged, final))
        if all(r.get("finetune_curve") for r in runs):
            rho["probe accuracy"].append(_spearman([metric.goodness(r["finetune_curve"][0][metric.key])
                                                    for r in runs], final))
    if not spread_f:
        return []
    rho = {k: [v for v in vs if v == v] for k, vs in rho.items()}  # drop the undefined (NaN) ones
    summary.setdefault("_regime", {})[budget.name] = {"spread_merged": spread_m, "spread_finetuned": spread_f, **rho}
    def avg(values: list[float]) -> str:
        return f"{statistics.fmean(values):+.2f}" if values else "n/a"

    m, pts = metric.key, metric.points
    turned = "" if metric.higher_is_better else " (better first)"
    probe = (f", {m} after the first {budget.eval_steps} fine-tuning steps {avg(rho['probe accuracy'])}"
             if rho["probe accuracy"] else "")
    return [f"Does the start matter? Across the starts (methods and experts alone), the best minus the worst "
            f"{m} is {statistics.fmean(spread_m):.1f}{pts} merged and {statistics.fmean(spread_f):.1f}{pts} "
            f"fine-tuned (mean over seeds). Rank correlation of the fine-tuned {m}{turned} with: merged loss "
            f"(lower first) {avg(rho['merged loss'])}, merged {m}{turned} {avg(rho['merged accuracy'])}"
            f"{probe}.", ""]


def _plot(labels: dict, names: list[str], threshold: float, setup: str, budget, metric: Metric, path: Path) -> None:
    """Mean held-out metric against fine-tuning steps for each start, with the best expert's final level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        curves = [_curve(r, metric) for r in labels[name]]
        steps = [s for s, _ in curves[0]]
        means = [statistics.fmean(c[i][1] for c in curves if len(c) > i) for i in range(len(steps))]
        style = "-" if name.startswith("GLUE") else "--"
        ax.plot(steps, [metric.show(m) for m in means], style, marker="o", markersize=3, label=name)
    ax.axhline(metric.show(threshold), color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel(f"held-out {metric.heading}")
    ax.set_title(f"{setup}: {metric.key} during fine-tuning ({budget.rows} rows, {budget.epochs:g} epochs)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMBINE_LABELS = {"uniform": "uniform λ = 1/K", "glue": "GLUE-learned λ", "cma": "CMA-ES-learned λ",
                  "nevergrad": "NGOpt-learned λ"}


def _stat_plain(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def write_combine(setup, outputs: list, references: list, folder: Path, command: str, density: float) -> str:
    """The task-vector table (``<setup>-combine.md`` / ``.json``): per budget, per --combine method, the held-out
    accuracy and loss of uniform λ = 1/K and of each learned λ, their mean λ, and on how many seeds the learned λ
    beat uniform; then, from the plain simplex runs of the same seeds (``references``), GLUE merged and the best
    single expert (both without fine-tuning). ``outputs``: (combine, budget, seed, folder); ``references``:
    (budget, seed, folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    metric = METRICS[setup.metric]
    prefix = f"exp/{setup.name}-"
    experts = [prefix + name for name in setup.experts]
    lines = [f"### {setup.name}: task vectors", "", f"Command: `{command}`", ""]
    summary: dict = {}
    for budget in setup.budgets:
        runs: dict = {}  # {(combine, method): {seed: run}}
        for combine, b, seed, out in outputs:
            if b.name != budget.name:
                continue
            for run in json.loads((out / "compare.json").read_text())["runs"]:
                runs.setdefault((combine, run["method"]), {})[seed] = run
        if not runs:
            continue
        seeds = sorted({s for by_seed in runs.values() for s in by_seed})
        lines += [f"**Budget {budget.name}**: {budget.rows} target rows for the search, no fine-tuning; held-out "
                  f"{metric.heading} and loss over seeds {seeds}, mean ± std; λ in expert order "
                  f"({', '.join(setup.experts)}), mean over seeds; density {density:g} for ties / dare.", "",
                  f"| combine | start | {metric.heading} | loss | λ (mean) | beats uniform ({metric.key}, seeds) | "
                  "forward passes | search seconds |", "|---|---|---|---|---|---|---|---|"]
        summary[budget.name] = {}
        combines = list(dict.fromkeys(c for c, _ in runs))
        for combine in combines:
            uniform = runs.get((combine, "uniform"), {})
            # a processed expert alone: "task vector: X" (older outputs: "expert: X")
            expert_rows = {m: r for (c, m), r in runs.items()
                           if c == combine and m.startswith(("expert: ", "task vector: "))}
            best = (max(expert_rows, key=lambda m: metric.goodness(statistics.fmean(
                r["merged"][metric.key] for r in expert_rows[m].values())))
                    if expert_rows else None)
            names = [m for m in COMBINE_LABELS if (combine, m) in runs] + ([best] if best else [])
            for method in names:
                by_seed = runs[(combine, method)] if method != best else expert_rows[best]
                rs = [by_seed[s] for s in sorted(by_seed)]
                acc = [r["merged"][metric.key] for r in rs]
                loss = [r["merged"]["loss"] for r in rs]
                lam = [statistics.fmean(r["coefficients"].get(e, 0.0) for r in rs) for e in experts]
                label = (COMBINE_LABELS[method] if method != best
                         else f"best expert alone, λ = e_k ({best.split(': ', 1)[1][len(prefix):]}, oracle)")
                if sorted(by_seed) != seeds:
                    label += f" (seeds {sorted(by_seed)} only)"
                wins = "–"
                if method in ("glue", "cma", "nevergrad") and uniform:
                    common = [s for s in by_seed if s in uniform]
                    won = sum(metric.goodness(by_seed[s]["merged"][metric.key])
                              > metric.goodness(uniform[s]["merged"][metric.key]) + 1e-12 for s in common)
                    wins = f"{won}/{len(common)}"
                seconds = statistics.fmean(r["seconds"] for r in rs)
                lines.append(f"| {combine} | {label} | {_stat(acc, metric)} | {_stat_plain(loss)} | "
                             f"{' '.join(f'{v:.2f}' for v in lam)} | {wins} | {rs[0]['forward_passes']} | "
                             f"{seconds:.1f} |")
                summary[budget.name][f"{combine} · {label}"] = {
                    metric.key: acc, "loss": loss, "lambda_mean": lam, "seconds": seconds,
                    "coefficients": [r["coefficients"] for r in rs], "seeds": sorted(by_seed)}
        ref = {}
        for b, seed, out in references:
            if b.name == budget.name and seed in seeds:
                for run in json.loads((out / "compare.json").read_text())["runs"]:
                    ref.setdefault(run["method"], {})[seed] = run
        if ref:
            ref_seeds = sorted({s for by_seed in ref.values() for s in by_seed})
            rows = []
            if "glue" in ref:
                rows.append(("GLUE merge on the simplex (no fine-tuning)", ref["glue"]))
            ex = {m: r for m, r in ref.items() if m.startswith("expert: ")}
            if ex:
                best = max(ex, key=lambda m: metric.goodness(statistics.fmean(r["merged"][metric.key]
                                                                             for r in ex[m].values())))
                rows.append((f"best single expert ({best[len('expert: ' + prefix):]}, oracle)", ex[best]))
            for label, by_seed in rows:
                rs = [by_seed[s] for s in sorted(by_seed)]
                acc = [r["merged"][metric.key] for r in rs]
                loss = [r["merged"]["loss"] for r in rs]
                lam = [statistics.fmean(r["coefficients"].get(e, 0.0) for r in rs) for e in experts]
                lines.append(f"| simplex (runs/, seeds {ref_seeds}) | {label} | {_stat(acc, metric)} | "
                             f"{_stat_plain(loss)} | {' '.join(f'{v:.2f}' for v in lam)} | – | "
                             f"{rs[0]['forward_passes']} | {statistics.fmean(r['seconds'] for r in rs):.1f} |")
                summary[budget.name][f"simplex · {label}"] = {metric.key: acc, "loss": loss, "lambda_mean": lam,
                                                             "seeds": sorted(by_seed)}
        lines.append("")
    suffix = "" if density == 0.5 else f"-d{density:g}"
    text = "\n".join(lines)
    (folder / f"{setup.name}-combine{suffix}.md").write_text(text)
    (folder / f"{setup.name}-combine{suffix}.json").write_text(json.dumps(summary, indent=1))
    return text
