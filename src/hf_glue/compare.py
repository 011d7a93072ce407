"""`hf-glue compare`: every method (and every expert alone) on the same resolved inputs, one table.

The experts and target data are resolved, validated and loaded once; each method then learns α, its blend is
evaluated on the held-out split and, with --finetune-epochs, fine-tuned and evaluated again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .config import CompareConfig, DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, torch_dtype
from .engine.matrix import ExpertMatrix
from .errors import GlueError
from .io.output import COMPARE_FILE, atomic_dir, check_output_dir, input_paths, strict_json
from .methods import MethodOutput, check_method, get_method
from .engine.memory import memory_in_use, peak_memory_bytes, reset_peak_memory
from .report.comparison import build_report, format_table, plot_comparison

DEFAULT_METHODS = CompareConfig().methods


def _methods(glue: GlueConfig, compare: CompareConfig) -> list[str]:
    for name in compare.methods:
        check_method(name)  # unknown, or an optional package missing: before anything is loaded
        try:
            replace(glue, method=name)  # a method the other options refuse (e.g. cma with --granularity auto)
        except GlueError as err:
            raise GlueError(f"{err} Or leave {name} out of --methods.") from None
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
    from .pipeline import blended_model, finetune_result, prepare, run_method, to_result, with_probe_rate

    glue_config = with_probe_rate(glue_config, finetune_config)
    methods = _methods(glue_config, compare_config)
    read_training_args(finetune_config.training_args)
    out_dir = Path(compare_config.output_dir)
    check_output_dir(out_dir, compare_config.overwrite_output_dir,
                     input_paths(experts_config.experts, data_config.dataset), marker=COMPARE_FILE)
    baselines = _resolve_baselines(compare_config.baselines, experts_config, data_config)  # metadata: fails early
    prep = prepare(experts_config, data_config, glue_config, finetune=finetune_config.finetune_epochs > 0,
                   whole=bool(baselines) or (glue_config.combine or "").startswith("dare")
                   or "full-gradient" in methods)
    finetuning = finetune_config.finetune_epochs > 0
    entries = [(m, m) for m in methods]
    if compare_config.include_experts:
        # with --combine a row is the base plus that expert's processed task vector, not the expert itself
        label = "task vector" if prep.kind == "task-vectors" else "expert"
        entries += [(f"{label}: {name}", k) for k, name in enumerate(prep.matrix.expert_names)]
    runs = []
    for baseline in baselines:  # one at a time: a baseline is a whole model beside the experts' matrix
        params = _load_baseline(prep, baseline)
        runs += [_baseline_run(prep, glue_config, finetune_config, baseline.name, params, seed)
                 for seed in (compare_config.seeds if finetuning else compare_config.seeds[:1])]
        del params
    # DARE's drop mask is drawn from the seed: every row is then seeded, and each seed has its own mask
    masked = (getattr(prep.matrix, "task_vectors", None) or {}).get("method") in ("dare", "dare-ties")
    for seed in compare_config.seeds:
        if masked:
            _redraw_mask(prep, glue_config.engine_granularity(), seed)
        for label, what in entries:
            seeded = masked or finetuning or (isinstance(what, str) and get_method(what).seeded)
            if not seeded and seed != compare_config.seeds[0]:
                continue
            config = replace(glue_config, method=what if isinstance(what, str) else "uniform", seed=seed)
            before = memory_in_use(prep.matrix.device)  # the loaded experts (and whatever earlier runs kept)
            out = run_method(prep, config) if isinstance(what, str) else _one_hot(prep, what)
            own_peak = None if out.peak_memory_bytes is None or before is None else \
                max(0, out.peak_memory_bytes - before)
            result = to_result(prep, config, out)
            if finetuning:
                result.model = blended_model(prep, result.alpha)
                finetune_result(prep, result, finetune_config, seed, before=result.eval)  # measured just now
            runs.append({
                "method": label,
                "seed": seed,
                "coefficients": result.coefficients,
                "merged": result.eval,
                "finetuned": result.eval_after,
                "finetune_curve": result.finetune_curve,
                "forward_passes": result.forward_passes,
                # of which scoring candidates on the validation rows, and the candidate kept (searching methods)
                "validation_passes": (result.details.get("selection") or {}).get("forward_passes", 0),
                "selected": (result.details.get("selection") or {}).get("chosen"),
                "backward_passes": result.backward_passes,
                "seconds": result.seconds,
                "peak_memory_bytes": own_peak,  # this method's own peak, above memory_before_bytes
                "memory_before_bytes": before,
            })
            result.model = None  # the next run's search must not sit beside this run's model
    labels = [f"model: {b.name}" for b in baselines] + [label for label, _ in entries]
    report = build_report(prep, runs, labels, compare_config.seeds, finetuning)
    if prep.accelerator.is_main_process:
        with atomic_dir(out_dir, compare_config.overwrite_output_dir, marker=COMPARE_FILE) as tmp:
            (tmp / COMPARE_FILE).write_text(strict_json(report))
            plot_comparison(report, tmp / "compare.png")
        print(format_table(report))
        print(f"Wrote {out_dir / COMPARE_FILE} and {out_dir / 'compare.png'}")
    return report


def _redraw_mask(prep, granularity: str, seed: int) -> None:
    """Rebuild the task vectors with the DARE mask of ``seed`` (the experts are read again, one matrix at a time)."""
    spec = prep.matrix.task_vectors
    if spec["seed"] == seed:
        return
    device = prep.matrix.device
    prep.matrix.release(experts=True)
    prep.matrix = prep.objective.matrix = ExpertMatrix.from_task_vectors(
        prep.experts, prep.base, spec["method"], density=spec["density"], weights=spec["election_weights"],
        seed=seed, granularity=granularity, dtype=torch_dtype(prep.experts_config.dtype), device=device)


def _one_hot(prep, k: int) -> MethodOutput:
    alpha = torch.zeros(prep.matrix.num_groups, prep.matrix.num_experts, dtype=torch.float64)
    alpha[:, k] = 1.0
    reset_peak_memory(prep.matrix.device)
    return MethodOutput(alpha=alpha, peak_memory_bytes=peak_memory_bytes(prep.matrix.device))


def _resolve_baselines(specs: list[str], experts_config: ExpertsConfig, data_config: DataConfig) -> list:
    """The --baselines checkpoints' metadata, checked against the first expert's architecture before any weight is
    downloaded or loaded."""
    from .io.experts import check_compatible, resolve_experts
    from .tasks import detect_task

    if not specs:
        return []
    clash = sorted(set(specs) & set(experts_config.experts))
    if clash:
        raise GlueError(f"--baselines {clash[0]!r} is also an expert; each expert is already scored alone.")
    from .io.adapters import is_adapter
    from .io.experts import resolve_repos

    if any(is_adapter(r.path) for r in resolve_repos(experts_config.experts[:1], minimum=1)):
        raise GlueError("--baselines scores full checkpoints beside full experts; with LoRA adapters the base is "
                        "already the blend at α = 0: drop --baselines.")
    baselines = resolve_experts(specs, what="baseline", minimum=1)
    reference = resolve_experts(experts_config.experts[:1], minimum=1)[0]
    task = detect_task(reference.config, data_config.task)
    try:
        check_compatible([reference, *baselines], task.model_class(), experts_config.trust_remote_code)
    except GlueError as err:
        raise GlueError(f"--baselines: {err}") from None
    return baselines


def _load_baseline(prep, baseline) -> dict[str, torch.Tensor]:
    """A baseline's weights in the experts' parameter names, dtype and device; refuses one that lacks any of the
    model's parameters (e.g. a checkpoint without the task head)."""
    from .io.experts import fetch_weights, read_through_transformers

    cfg = prep.experts_config
    fetch_weights([baseline], cfg.allow_pickle)
    if prep.experts[0].loader is not None:  # the experts were read through transformers: read it the same way
        read_through_transformers([baseline], prep.task.model_class(), cfg.trust_remote_code)
    # the template's dtype (float32 for half-precision experts): the baseline is scored as a blend is (one model
    # at a time beside the experts; compare's baselines run on the replicated engine)
    dtype = prep.matrix.search_dtype
    device = prep.matrix.device
    tensors = baseline.loader() if baseline.loader is not None else dict(baseline.iter_tensors())
    missing = [name for name, _ in prep.model.named_parameters() if name not in tensors]
    if missing:
        raise GlueError(f"baseline {baseline.name!r} lacks parameter {missing[0]!r} of {type(prep.model).__name__} "
                        f"({len(missing)} missing): pass a checkpoint of the experts' class, task head included.")
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in tensors.items()}


def _baseline_run(prep, glue_config: GlueConfig, finetune_config: FinetuneConfig, name: str,
                  params: dict[str, torch.Tensor], seed: int) -> dict:
    """A baseline checkpoint scored (and fine-tuned) exactly as a blend is: no search, no coefficients."""
    from .pipeline import eval_batches, finetune_result
    from .report.result import MergeResult

    merged = prep.objective.evaluate_params(params, eval_batches(prep, glue_config))
    merged.pop("samples", None)
    result = MergeResult(method=name, task=prep.task.name, granularity="model", experts=[], dataset={},
                         coefficients={}, alpha=torch.zeros(0), eval=merged)
    if finetune_config.finetune_epochs > 0:  # in the experts' dtype, as the blends are fine-tuned
        from .pipeline import empty_model

        dtype = prep.matrix.model_dtype
        result.model = empty_model(prep)
        result.model.load_state_dict({k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone()
                                      for k, v in params.items()}, strict=False, assign=True)
        result.model.tie_weights()
        finetune_result(prep, result, finetune_config, seed, before=merged)
    return {"method": f"model: {name}", "seed": seed, "coefficients": {}, "merged": merged,
            "finetuned": result.eval_after, "finetune_curve": result.finetune_curve, "forward_passes": 0,
            "backward_passes": 0, "seconds": 0.0, "peak_memory_bytes": None, "memory_before_bytes": None}
