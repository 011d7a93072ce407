"""`hf-glue blend`: write θ = Σ α_k θ_k for known coefficients straight from the experts' files.

No model is instantiated and no data is needed: experts are resolved and checked like in `merge`, then the
output is streamed tensor by tensor (see `streaming.py`), with the card and ``merge_result.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .engine.matrix import group_of
from .config import BlendConfig, ExpertsConfig, OutputConfig, torch_dtype
from .errors import GlueError
from .io.experts import check_model_types, check_processor_files, fetch_weights, resolve_experts
from .methods import method_info
from .methods.weights import check_weights
from .io.output import atomic_dir, check_output_dir
from .report.result import RESULT_FILE, copy_processor_files, write_card


def _from_result(path: str) -> tuple[list[str], dict]:
    file = Path(path)
    if not file.is_file():
        raise GlueError(f"--from-result {path!r} does not exist.")
    result = json.loads(file.read_text())
    specs = [f"{e['id']}@{e['revision']}" if e.get("revision") else e["id"] for e in result["experts"]]
    return specs, result


def run_blend(experts_config: ExpertsConfig, blend: BlendConfig, output: OutputConfig, command: str = "") -> Path:
    """Validate everything, then stream the blend into ``output.output_dir`` atomically."""
    from .engine.memory import parse_size
    from .versions import library_versions

    if bool(blend.from_result) == bool(blend.weights):
        raise GlueError("give either --weights w1 w2 ... or --from-result merge_result.json (not both, not neither).")
    source: Optional[dict] = None
    if blend.from_result:
        if experts_config.experts:
            raise GlueError("--from-result names the experts itself; drop --experts.")
        specs, source = _from_result(blend.from_result)
    else:
        specs = experts_config.experts
        check_weights(blend.weights, len(specs))
    if not output.output_dir:
        raise GlueError("no output folder: pass --output-dir DIR.")
    check_output_dir(output.output_dir, output.overwrite_output_dir)
    max_shard = parse_size(blend.max_shard_size)
    start = time.perf_counter()
    experts = resolve_experts(specs)
    check_model_types(experts)
    check_processor_files(experts)
    fetch_weights(experts, allow_pickle=False)
    names = [e.name for e in experts]
    if source is not None:
        granularity = source.get("granularity", "model")
        groups = source.get("group_coefficients") or {}
        by_id = {e["name"]: spec for e, spec in zip(source["experts"], specs)}
        coefficients = {by_id[k]: v for k, v in source["coefficients"].items()}

        def weights(name: str) -> list[float]:
            if granularity == "model" or not groups:
                return [coefficients[n] for n in names]
            group = group_of(name, granularity)
            if group not in groups:
                raise GlueError(f"--from-result has no coefficients for group {group!r} (tensor {name!r}).")
            row = {by_id[k]: v for k, v in groups[group].items()}
            return [row[n] for n in names]
    else:
        coefficients = dict(zip(names, blend.weights))

        def weights(name: str) -> list[float]:
            return list(blend.weights)

    from .engine.streaming import blend_checkpoints

    with atomic_dir(output.output_dir, output.overwrite_output_dir) as tmp:
        blend_checkpoints(experts, weights, tmp, dtype=torch_dtype(experts_config.dtype), max_shard_bytes=max_shard)
        copy_processor_files(experts[0].repo.path, tmp, extra=("config.json", "generation_config.json"))
        result = {
            "method": source["method"] if source else "weights",
            "method_info": method_info(source["method"] if source else "weights"),
            "task": source.get("task") if source else _task_name(experts[0].config),
            "granularity": source.get("granularity", "model") if source else "model",
            "experts": [{"name": e.name, **e.repo.to_dict()} for e in experts],
            "dataset": source.get("dataset") if source else None,
            "coefficients": coefficients,
            "history": [],
            "eval": source.get("eval", {}) if source else {},
            "forward_passes": 0,
            "backward_passes": 0,
            "seconds": round(time.perf_counter() - start, 3),
            "command": command,
            "versions": library_versions(),
        }
        if source and source.get("group_coefficients"):  # keyed like this result's experts (pinned specs)
            result["group_coefficients"] = {g: {by_id[k]: v for k, v in row.items()}
                                            for g, row in source["group_coefficients"].items()}
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        write_card(tmp, result)
    return Path(output.output_dir)


def _task_name(config: dict) -> Optional[str]:
    from .tasks import detect_task

    try:
        return detect_task(config).name
    except GlueError:
        return None
