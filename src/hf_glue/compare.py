"""`hf-glue compare`: every method (and every expert alone) on the same resolved inputs, one table.

The experts and target data are resolved, validated and loaded once; each method then learns α, its blend is
evaluated on the held-out split and, with --finetune-epochs, fine-tuned and evaluated again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .config import CompareConfig, DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig
from .errors import GlueError
from .io.output import COMPARE_FILE, atomic_dir, check_output_dir, input_paths, strict_json
from .methods import MethodOutput, get_method
from .engine.memory import memory_in_use, peak_memory_bytes, reset_peak_memory
from .report.comparison import build_report, format_table, plot_comparison

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
    check_output_dir(out_dir, compare_config.overwrite_output_dir,
                     input_paths(experts_config.experts, data_config.dataset), marker=COMPARE_FILE)
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
            before = memory_in_use(prep.matrix.device)  # the loaded experts (and whatever earlier runs kept)
            out = run_method(prep, config) if isinstance(what, str) else _one_hot(prep, what)
            own_peak = None if out.peak_memory_bytes is None or before is None else \
                max(0, out.peak_memory_bytes - before)
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
                "peak_memory_bytes": own_peak,  # this method's own peak, above memory_before_bytes
                "memory_before_bytes": before,
            })
            result.model = None  # the next run's search must not sit beside this run's model
    report = build_report(prep, runs, [label for label, _ in entries], compare_config.seeds, finetuning)
    if prep.accelerator.is_main_process:
        with atomic_dir(out_dir, compare_config.overwrite_output_dir, marker=COMPARE_FILE) as tmp:
            (tmp / COMPARE_FILE).write_text(strict_json(report))
            plot_comparison(report, tmp / "compare.png")
        print(format_table(report))
        print(f"Wrote {out_dir / COMPARE_FILE} and {out_dir / 'compare.png'}")
    return report


def _one_hot(prep, k: int) -> MethodOutput:
    alpha = torch.zeros(prep.matrix.num_groups, prep.matrix.num_experts, dtype=torch.float64)
    alpha[:, k] = 1.0
    reset_peak_memory(prep.matrix.device)
    return MethodOutput(alpha=alpha, peak_memory_bytes=peak_memory_bytes(prep.matrix.device))
