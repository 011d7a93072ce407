"""`hf-glue blend`: write θ = Σ α_k θ_k for known coefficients straight from the experts' files.

No model is instantiated and no data is needed: experts are resolved and checked like in `merge`, then the
output is streamed tensor by tensor (see `streaming.py`), with the card and ``merge_result.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

from .engine.matrix import group_of
from .config import BlendConfig, ExpertsConfig, OutputConfig, torch_dtype
from .errors import GlueError
from .io.adapters import is_adapter
from .io.experts import (check_model_types, check_processor_files, expert_from_repo, fetch_weights, resolve_experts,
                         resolve_repos)
from .methods import method_info
from .methods.weights import check_weights
from .io.output import (RESULT_FILE, atomic_dir, check_free_space, check_output_dir, input_paths, output_bytes,
                        strict_json)
from .report.result import copy_processor_files, save_model, settle_remote_code, write_card


def _convex(values: Sequence, where: str) -> list[float]:
    """``values`` as floats if they form a convex combination: finite, non-negative, summing to 1."""
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise GlueError(f"{where} must be numbers; got {list(values)}.") from None
    if not all(math.isfinite(v) for v in floats):
        raise GlueError(f"{where} must be finite numbers; got {floats}.")
    if any(v < 0 for v in floats) or abs(sum(floats) - 1.0) > 1e-6:
        raise GlueError(f"{where} must be non-negative and sum to 1 (a convex combination); got {floats}.")
    return floats


def _from_result(path: str) -> tuple[list[str], list[str], dict]:
    """The expert specs (pinned), the expert names (the result's coefficient keys) and the checked result."""
    file = Path(path)
    if not file.is_file():
        raise GlueError(f"--from-result {path!r} does not exist.")
    try:
        result = json.loads(file.read_text())
        experts = result["experts"]
        specs = [f"{e['id']}@{e['revision']}" if e.get("revision") else e["id"] for e in experts]
        names = [e.get("name") or e["id"] for e in experts]
        coefficients = result["coefficients"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise GlueError(f"--from-result {path!r} is not an hf-glue merge_result.json.") from None
    rows = {"coefficients": coefficients}
    if result.get("granularity", "model") != "model":
        rows.update({f"group {g!r}": row for g, row in (result.get("group_coefficients") or {}).items()})
    task_vectors = (result.get("details") or {}).get("task_vectors")
    for where, row in rows.items():
        if not isinstance(row, dict) or sorted(row) != sorted(names):
            raise GlueError(f"--from-result {path!r}: {where} must give one value for each of its experts "
                            f"{names}.")
        if task_vectors:  # coefficients of task vectors: any finite values (a box, not the simplex)
            if not all(isinstance(row[n], (int, float)) and math.isfinite(row[n]) for n in names):
                raise GlueError(f"--from-result {path!r}: {where} must be finite numbers.")
        else:
            _convex([row[n] for n in names], f"--from-result {path!r}: {where}")
    return specs, names, result


def run_blend(experts_config: ExpertsConfig, blend: BlendConfig, output: OutputConfig, command: str = "") -> Path:
    """Validate everything, then stream the blend into ``output.output_dir`` atomically."""
    from .engine.memory import parse_size
    from .versions import library_versions

    if bool(blend.from_result) == bool(blend.weights):
        raise GlueError("give either --weights w1 w2 ... or --from-result merge_result.json (not both, not neither).")
    if experts_config.shard or experts_config.blend != "auto" or experts_config.offload != "none":
        raise GlueError("--blend, --shard and --offload choose how a search holds its experts; `hf-glue blend` "
                        "already streams them tensor by tensor: drop them.")
    source: Optional[dict] = None
    if blend.from_result:
        if experts_config.experts:
            raise GlueError("--from-result names the experts itself; drop --experts.")
        specs, names, source = _from_result(blend.from_result)
    else:
        specs = names = experts_config.experts
        _convex(check_weights(blend.weights, len(specs)), "--weights")
    if not output.output_dir:
        raise GlueError("no output folder: pass --output-dir DIR.")
    extra = [("the --from-result file", blend.from_result)] if blend.from_result else []
    check_output_dir(output.output_dir, output.overwrite_output_dir, input_paths(specs, extra=extra))
    max_shard = parse_size(blend.max_shard_size)
    dtype = torch_dtype(experts_config.dtype)
    start = time.perf_counter()
    repos = resolve_repos(specs)
    if any(is_adapter(r.path) for r in repos):
        return _blend_adapters(repos, names, source, experts_config, blend, output, command, start)
    if output.save_as == "adapter":
        raise GlueError("--save-as adapter is for LoRA experts; full experts blend into a full model.")
    experts = [expert_from_repo(r) for r in repos]
    task_vectors = ((source or {}).get("details") or {}).get("task_vectors")
    transform = None
    if task_vectors:  # θ = θ_base + Σ λ_k τ̂_k: the base is one more input, with coefficient 1
        base_info = source.get("base_model") or {}
        base_spec = f"{base_info['id']}@{base_info['revision']}" if base_info.get("revision") else base_info.get("id")
        if not base_spec:
            raise GlueError(f"--from-result {blend.from_result!r} has task vectors but names no base_model.")
        experts.append(resolve_experts([base_spec], what="base model", minimum=1)[0])
        source_dtype = source_dtype_of(source)
        transform = _task_vector_transform(task_vectors, torch_dtype(source_dtype))
    check_model_types(experts)
    check_processor_files(experts)
    fetch_weights(experts, allow_pickle=False)
    check_free_space(output.output_dir, output_bytes(experts[0].tensors.values(), dtype))
    if source is not None:
        granularity = source.get("granularity", "model")
        groups = source.get("group_coefficients") or {}
        coefficients = source["coefficients"]

        def weights(name: str) -> list[float]:
            base = [1.0] if task_vectors else []
            if granularity == "model" or not groups:
                return [coefficients[n] for n in names] + base
            group = group_of(name, granularity)
            if group not in groups:
                raise GlueError(f"--from-result has no coefficients for group {group!r} (tensor {name!r}).")
            return [groups[group][n] for n in names] + base
    else:
        coefficients = dict(zip(names, blend.weights))

        def weights(name: str) -> list[float]:
            return list(blend.weights)

    from .engine.streaming import blend_checkpoints

    with atomic_dir(output.output_dir, output.overwrite_output_dir) as tmp:
        blend_checkpoints(experts, weights, tmp, dtype=dtype, max_shard_bytes=max_shard, transform=transform)
        copy_processor_files(experts[0].repo.path, tmp, extra=("config.json", "generation_config.json"))
        settle_remote_code(tmp, experts[0].repo.path, experts_config.trust_remote_code)
        if dtype is not None and (tmp / "config.json").is_file():
            _set_config_dtype(tmp / "config.json", experts_config.dtype)
        result = _blend_result(
            source, names, experts[:len(names)], coefficients, experts_config, command, start,
            task=source.get("task") if source else _task_name(experts[0].config),
            granularity=source.get("granularity", "model") if source else "model",
            base=experts[-1] if task_vectors else None, versions=library_versions())
        if task_vectors:
            result["config"]["glue"] = source["config"]["glue"]
            result["details"] = {"task_vectors": task_vectors}
        if source and source.get("eval"):
            source_dtype = source_dtype_of(source)
            if source_dtype == experts_config.dtype:  # the same weights: the source's metrics hold
                result["eval"] = source["eval"]
            else:  # measured on the source's weights only: kept apart, out of the card
                result["source_eval"] = {"dtype": source_dtype, "eval": source["eval"]}
        (tmp / RESULT_FILE).write_text(strict_json(result))
        write_card(tmp, result)
    return Path(output.output_dir)


def _blend_adapters(repos, names: list[str], source: Optional[dict], experts_config: ExpertsConfig,
                    blend: BlendConfig, output: OutputConfig, command: str, start: float) -> Path:
    """`blend` for LoRA experts: the base with every adapter loaded once (PEFT), the coefficients applied by the
    same code as `merge`'s save, written as the merged model or as one adapter (--save-as)."""
    import dataclasses

    import torch

    from . import lora
    from .pipeline import output_model
    from .versions import library_versions

    if not all(is_adapter(r.path) for r in repos):
        raise GlueError("the experts mix LoRA adapters and full checkpoints; blend one kind at a time.")
    if source is not None and not experts_config.base_model and source.get("base_model"):
        base = source["base_model"]
        experts_config = dataclasses.replace(
            experts_config, base_model=f"{base['id']}@{base['revision']}" if base.get("revision") else base["id"])
    adapters, base, task, model_config = lora.resolve(repos, experts_config, source.get("task") if source else None)
    fetch_weights([base], experts_config.allow_pickle)
    check_free_space(output.output_dir, output_bytes(base.tensors.values(), torch_dtype(experts_config.dtype)))
    granularity = source.get("granularity", "model") if source else "model"
    device = torch.device("cpu")
    model, matrix = lora.load(base, adapters, task, model_config, experts_config, granularity, device)
    if source is not None:
        coefficients = source["coefficients"]
        groups = source.get("group_coefficients") or {g: coefficients for g in matrix.groups}
        missing = [g for g in matrix.groups if g not in groups]
        if missing:
            raise GlueError(f"--from-result has no coefficients for group {missing[0]!r}.")
        alpha = torch.tensor([[groups[g][n] for n in names] for g in matrix.groups], dtype=torch.float64)
    else:
        coefficients = dict(zip(names, blend.weights))
        alpha = torch.tensor([list(blend.weights)] * matrix.num_groups, dtype=torch.float64)
    out = output_model(matrix.to_adapter_model(alpha, {"base_model_name_or_path": base.repo.repo_id,
                                                       "revision": base.repo.revision}), output.save_as)
    with atomic_dir(output.output_dir, output.overwrite_output_dir) as tmp:
        save_model(out, tmp)
        copy_processor_files(base.repo.path, tmp)
        result = _blend_result(source, names, adapters, coefficients, experts_config, command, start,
                               task=task.name, granularity=granularity, base=base,
                               versions=library_versions(("peft",)))
        result["save_as"] = output.save_as
        (tmp / RESULT_FILE).write_text(strict_json(result))
        write_card(tmp, result)
    return Path(output.output_dir)


def source_dtype_of(source: dict) -> str:
    """The --dtype the source merge's experts were held in (its metrics hold for a blend in the same dtype)."""
    return ((source.get("config") or {}).get("experts") or {}).get("dtype", "auto")


def _blend_result(source: Optional[dict], names: list[str], inputs, coefficients: dict, experts_config: ExpertsConfig,
                  command: str, start: float, *, task: Optional[str], granularity: str, base, versions: dict) -> dict:
    """The ``merge_result.json`` of a blend: the coefficients applied (and the source merge's method, dataset and
    per-group coefficients), the pinned inputs, and no search (no history, no passes)."""
    result = {
        "method": source["method"] if source else "weights",
        "method_info": method_info(source["method"] if source else "weights"),
        "task": task,
        "granularity": granularity,
        "experts": [{"name": n, **e.repo.to_dict()} for n, e in zip(names, inputs)],
        **({"base_model": {"name": base.name, **base.repo.to_dict()}} if base is not None else {}),
        "dataset": source.get("dataset") if source else None,
        "coefficients": coefficients,
        "history": [],
        "eval": {},
        "forward_passes": 0,
        "backward_passes": 0,
        "seconds": round(time.perf_counter() - start, 3),
        "command": command,
        "versions": versions,
        "config": {"experts": {"dtype": experts_config.dtype}},
    }
    if source and source.get("group_coefficients"):
        result["group_coefficients"] = source["group_coefficients"]
    if source and source.get("method") != "weights":
        # what the search that learned α cost, and θ(α)'s held-out metrics as it measured them (same weights, up
        # to rounding): the card shows them, marked as the search's
        result["learned_by"] = {k: source.get(k) for k in ("forward_passes", "backward_passes", "seconds")}
        if source.get("learned_by"):  # a blend of a blend: the search behind the first
            result["learned_by"] = dict(source["learned_by"])
        merged_eval = source.get("eval_before") or (None if source.get("eval_after") else source.get("eval"))
        source_dtype = source_dtype_of(source)
        if merged_eval and source_dtype == experts_config.dtype:  # else measured on other weights: left out
            result["learned_by"]["eval"] = merged_eval
    return result


def _task_vector_transform(spec: dict, dtype):
    """The per-tensor step of a task-vector blend: the K experts' values and the base's become τ̂_1…τ̂_K and
    the base, processed exactly as the merge did (`task_vectors.tensor_task_vectors`)."""
    from .engine.task_vectors import tensor_task_vectors

    def transform(name: str, tensors: list) -> list:
        import torch

        # as the merge's matrix held them: experts and base in the experts' dtype (or the merge's --dtype)
        held = dtype or tensors[0].dtype
        base = tensors[-1].to(held)
        tau = tensor_task_vectors(name, torch.stack([t.to(held) for t in tensors[:-1]]), base, spec["method"],
                                  spec["density"], spec["election_weights"], spec["seed"])
        return [*tau.to(held), base]

    return transform


def _set_config_dtype(path: Path, dtype: str) -> None:
    """Record the output's weight dtype in its config.json (``dtype``, and ``torch_dtype`` where present)."""
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _task_name(config: dict) -> Optional[str]:
    from .tasks import detect_task

    try:
        return detect_task(config).name
    except GlueError:
        return None
