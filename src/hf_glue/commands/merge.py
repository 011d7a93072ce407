"""`hf-glue merge`: learn α on the target data, blend, optionally fine-tune, save (and push)."""

from __future__ import annotations

import shlex
from typing import Optional

from ..config import DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig, PushConfig, TrackingConfig
from ..errors import GlueError
from .parsing import build_configs

HELP = "Learn merge coefficients on target data and save the merged model."
DESCRIPTION = (
    "Merge fine-tuned experts of one architecture into one model for a target dataset: α is learned with "
    "two-point SPSA (GLUE), the experts are blended as θ = Σ α_k θ_k, and the model, tokenizer, model card "
    "and merge_result.json are written to --output-dir.\n\nExample:\n  hf-glue merge --experts org/a org/b "
    "--dataset org/target --output-dir merged --steps 100"
)
CONFIGS = (ExpertsConfig, DataConfig, GlueConfig, FinetuneConfig, OutputConfig, PushConfig, TrackingConfig)
#: shown without brackets in the usage (a --config file may give them instead)
NEEDED = ("experts", "dataset", "output_dir")


def run(args: list[str], parser) -> int:
    experts, data, glue, finetune, output, push, trackers, _ = build_configs(parser, CONFIGS, args)
    from ..pipeline import run_merge  # after parsing: --help and argument errors come before torch loads

    if not output.output_dir:
        raise GlueError("no output folder: pass --output-dir DIR.")
    command = shlex.join(["hf-glue", "merge", *(a for a in args if a != "--resume")])  # reproduces, resumed or not
    result = run_merge(experts, data, glue, output, command=command,
                       finetune_config=finetune, push_config=push, tracking_config=trackers)
    if is_main_process():
        print_summary(result, output.output_dir)
    return 0


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def print_summary(result, output_dir: Optional[str]) -> None:
    width = max(len(n) for n in result.coefficients)
    print(f"Learned coefficients ({result.method}, {result.forward_passes} forward passes, {result.seconds:.1f} s):")
    for name, value in result.coefficients.items():
        print(f"  {name:<{width}}  {value:.4f}")
    if result.group_coefficients:
        print(f"Per group (granularity {result.granularity}, {len(result.group_coefficients)} groups; the lines above "
              "are their parameter-weighted mean):")
        print(format_groups(result.group_coefficients, list(result.coefficients)))
    selection = result.details.get("selection")
    if selection:
        print(format_selection(selection))
    probe = result.details.get("probe")
    if probe:
        print(f"Probe: each trained {probe['steps']} AdamW steps at {probe['learning_rate']:g} (validation loss "
              "before → after; * kept):")
        rows = [["*" if c["name"] == probe["chosen"] else "", f"{c['loss_before']:.4f}",
                 "–" if c["loss_after"] is None else f"{c['loss_after']:.4f}", c["name"]] for c in probe["candidates"]]
        print("\n".join(_table(["", "before", "after", "candidate"], rows)))
    stages = [("merged", result.eval_before or result.eval), ("fine-tuned", result.eval_after)]
    stages = [(stage, metrics) for stage, metrics in stages if metrics]
    if stages:
        dataset = result.dataset or {}
        where = f" ({dataset['id']} [{dataset.get('eval_split')}])" if dataset.get("id") else ""
        print(f"Held-out target{where}:")
        print(format_metrics(stages))
    if output_dir:
        print(f"Saved to {output_dir}" + (" (the fine-tuned model)" if result.eval_after else ""))
    if result.details.get("pushed_to"):
        print(f"Pushed to {result.details['pushed_to']}")
    tracking = result.details.get("tracking")
    if tracking:
        where = (f"; TensorBoard: {tracking['tensorboard']} (tensorboard --logdir {tracking['tensorboard']})"
                 if "tensorboard" in tracking else "")
        print(f"Logged to {', '.join(tracking['report_to'])} as run {tracking['run_name']!r}{where}")


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def format_metrics(stages: list[tuple[str, dict]]) -> str:
    """Held-out metrics, one row per stage (merged, fine-tuned), one column per metric."""
    names = list(dict.fromkeys(k for _, metrics in stages for k in metrics))
    rows = [[stage] + [f"{metrics[k]:.4f}" if k in metrics else "–" for k in names] for stage, metrics in stages]
    return "\n".join(_table(["stage"] + names, rows))


def format_selection(selection: dict) -> str:
    """Every candidate's loss on the validation rows held apart from the search, the chosen one marked."""
    where = "held apart from the search" if selection.get("held_apart", True) else "the search also used"
    kept = "* kept after the probe below" if selection.get("select") == "probe" else "* kept"
    lines = [f"Chosen on {selection['validation_rows']} train rows {where} (loss; {kept}):"]
    rows = [["*" if c["name"] == selection["chosen"] else "", "–" if c["loss"] is None else f"{c['loss']:.4f}",
             c["name"]] for c in selection["candidates"]]
    return "\n".join(lines + _table(["", "loss", "candidate"], rows))


def format_groups(groups: dict[str, dict[str, float]], experts: list[str], head: int = 6, tail: int = 4) -> str:
    """α per group (rows) and expert (columns); with many groups, the first ``head`` and last ``tail`` rows."""
    names = list(groups)
    cut = len(names) > head + tail + 1
    shown = names[:head] + names[-tail:] if cut else names
    lines = _table(["group"] + experts, [[name] + [f"{groups[name][e]:.4f}" for e in experts] for name in shown])
    if cut:
        lines.insert(1 + head, f"  … {len(names) - head - tail} more groups (all in merge_result.json)")
    return "\n".join(lines)
