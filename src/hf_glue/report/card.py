"""The model card: a pure function of ``merge_result.json`` (so ``hf-glue card DIR`` can regenerate it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


def template_path(name: str = "merge.md") -> Path:
    """A card template from ``hf_glue.model_cards``: the repository's top-level ``model_cards/`` folder, packaged
    under that name by pyproject.toml's ``package-dir`` (in wheels and editable installs alike)."""
    from importlib.resources import files

    return Path(str(files("hf_glue.model_cards").joinpath(name)))


TEMPLATE = template_path()


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def generate_card(result: dict, *, trajectory_png: Optional[str] = None, comparison: Optional[dict] = None,
                  mergekit_yaml: Optional[str] = None, folder_name: Optional[str] = None) -> str:
    """Render the card for a merge result dict (the content of ``merge_result.json``); ``mergekit_yaml``: the
    blend as a mergekit configuration (`mergekit.mergekit_config`), shown in a section of its own; ``folder_name``:
    the output folder's name, the model's id in the card until it is pushed (then its repo id)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..tasks import get_task

    method = result.get("method_info") or {"pretty_name": result["method"], "description": ""}
    task = get_task(result["task"]) if result.get("task") else None
    experts = [
        {
            "id": e["id"],
            "revision": e.get("revision"),
            "alpha": result["coefficients"][e["name"]],
            # Hub repos link to their page; a local folder is shown as code (a path is no URL: spaces, |, ...)
            "cell": f"[{e['id']}](https://huggingface.co/{e['id']})" if e.get("revision") else _code(e["id"], True),
            "header": e["id"] if e.get("revision") else _code(e["id"], True),
        }
        for e in result["experts"]
    ]
    hub_experts = [e["id"] for e in result["experts"] if e.get("revision")]
    dataset = result.get("dataset")
    base = result.get("base_model")
    glue = (result.get("config") or {}).get("glue") or {}
    combine = glue.get("combine")
    lora = bool(base) and not combine
    save_as = result.get("save_as") if lora else None
    hub_base = [base["id"]] if base and base.get("revision") else []
    model_id = result.get("model_name") or folder_name or "path/to/this/folder"
    licence, licence_note = _licence(result["experts"] + ([base] if base else []))  # task vectors: θ_base + Σλτ
    card_data = ModelCardData(
        license=licence,
        # an adapter's parent is its base; a merge's are the base and the adapters (or the experts)
        base_model=(hub_base if save_as == "adapter" else hub_base + hub_experts) or None,
        base_model_relation="adapter" if save_as == "adapter" else "merge",
        datasets=[dataset["id"]] if dataset and dataset.get("revision") else None,
        library_name="peft" if save_as == "adapter" else "transformers",
        pipeline_tag=task.pipeline_tag if task else None,
        tags=["merge", "hf-glue"] + (["lora"] if lora else []) + ([combine] if combine else [])
        + ([task.pipeline_tag] if task else []),
        eval_results=_eval_results(result, task) if task and dataset else None,
        model_name=model_id if model_id != "path/to/this/folder" else "hf-glue-merge",
    )
    groups = result.get("group_coefficients") or {}
    finetune = (result.get("config") or {}).get("finetune") or {}
    metrics_rows, metric_names = _metric_rows(result)
    comparison_rows, comparison_columns = _comparison_rows(comparison)
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=result.get("model_name") or (f"GLUE merge of {len(experts)} experts" if result["method"] == "glue" else
                                           f"Merge of {len(experts)} experts ({method['pretty_name']})"),
        method=result["method"],
        formula=_formula(lora, combine, glue),
        experts_noun=("LoRA adapters" if lora else "fine-tuned experts"),
        base=({**base, "label": (f"[{base['id']}](https://huggingface.co/{base['id']})" if base.get("revision")
                                 else _code(base["id"]))} if lora else None),
        save_as=save_as,
        auto_class=task.auto_model if task else "AutoModel",
        model_id=model_id,
        processor_class="AutoProcessor",
        # transformers 5 removed the text2text-generation pipeline: the snippet loads the model only there
        pipeline_tag=task.pipeline_tag if task and task.pipeline_tag != "text2text-generation" else None,
        licence_note=licence_note,
        method_pretty=method["pretty_name"],
        method_description=_describe(method["description"], result.get("details") or {}),
        experts=experts,
        granularity=result["granularity"],
        group_rows=[{"group": g, "values": [row[e["name"]] for e in result["experts"]]} for g, row in groups.items()],
        dataset=dataset,
        dataset_label=(dataset["id"] if dataset.get("revision") else _code(dataset["id"])) if dataset else None,
        finetuned=bool(result.get("eval_after")),
        finetune_epochs=_fmt_number(finetune.get("finetune_epochs")),
        finetune_lr=_fmt_number(finetune.get("learning_rate")),
        metrics_rows=metrics_rows,
        metric_names=metric_names,
        comparison_rows=comparison_rows,
        comparison_columns=comparison_columns,
        comparison_note=(comparison or {}).get("note"),
        trajectory_png=trajectory_png,
        selection=_selection(result.get("details") or {}),
        mergekit_yaml=(mergekit_yaml or "").rstrip("\n"),
        learned_by=result.get("learned_by"),
        forward_passes=result.get("forward_passes", 0),
        backward_passes=result.get("backward_passes", 0),
        seconds=result.get("seconds", 0.0),
        command=result.get("command", ""),
        versions=result.get("versions", {}),
    )
    return str(card)


def _licence(inputs: list[dict]) -> tuple[Optional[str], Optional[str]]:
    """(the licence every input's card states, or None; a note when they differ or some state none): a merge is a
    derivative of each input, so one licence is carried only when all agree."""
    if not any("license" in i for i in inputs):
        return None, None  # a result written before licences were recorded: nothing known, nothing claimed
    stated = {i["id"]: i.get("license") for i in inputs}
    found = set(stated.values())
    if len(found) == 1 and None not in found and found != {"other"}:  # "other" names no licence to carry
        return next(iter(found)), None
    listed = "; ".join(f"{name}: {value or 'not stated'}" for name, value in stated.items())
    return None, (f"The inputs' model cards do not state one licence ({listed}): this merge derives from each of "
                  "them, so check their terms before using or sharing it.")


def _selection(details: dict) -> Optional[dict]:
    """The validation rows and every candidate's loss there (`methods.selection`), as the card's table shows them."""
    selection = details.get("selection")
    if not selection:
        return None
    return {"rows": selection["validation_rows"], "seed": selection["split_seed"],
            "held_apart": selection.get("held_apart", True),
            "chosen": _code(selection["chosen"], True),
            # --granularity auto: the model-wide phase, then the per-group one and where it started
            "phases": [{**p, "start": _code(p["start"], True) if p.get("start") else None}
                       for p in details["phases"]] if details.get("phases") else None,
            # --select probe: the best candidates trained a few steps, their validation loss after them
            "probe": _probe(details.get("probe")),
            "candidates": [{"name": _code(c["name"], True), "chosen": c["name"] == selection["chosen"],
                            "loss": "–" if c["loss"] is None else f"{c['loss']:.4f}"}
                           for c in selection["candidates"]]}


def _probe(probe: Optional[dict]) -> Optional[dict]:
    if not probe:
        return None
    return {"steps": probe["steps"], "learning_rate": _fmt_number(probe["learning_rate"]),
            "by_loss": _code(probe["by_loss"], True),
            "rows": [{"name": _code(c["name"], True), "before": f"{c['loss_before']:.4f}",
                      "after": "–" if c["loss_after"] is None else f"{c['loss_after']:.4f}"}
                     for c in probe["candidates"]]}


def _formula(lora: bool, combine: Optional[str], glue: dict) -> str:
    """How the weights are formed from the coefficients, in the card's words."""
    if lora:
        return "θ(α) = θ_base + Σ α_k s_k B_k A_k of the adapters' low-rank updates"
    if combine:
        how = {"task-arithmetic": "as they are",
               "ties": f"TIES-processed (top {glue.get('density')} of each kept, signs elected)",
               "dare": f"DARE-processed (kept with probability {glue.get('density')}, rescaled)",
               "dare-ties": f"DARE-TIES-processed (kept with probability {glue.get('density')}, signs elected)"}
        return (f"θ(λ) = θ_base + Σ λ_k τ̂_k over the experts' task vectors τ_k = θ_k − θ_base, {how[combine]}, "
                f"with λ in {glue.get('bounds')}")
    return "the convex combination θ(α) = Σ α_k θ_k"


def _describe(description: str, details: dict) -> str:
    """The method's description, and a black-box search's settings when the result records them (cma, nevergrad)."""
    if "optimizer" not in details:
        return description
    return (f"{description}; search: {_code(details['optimizer'])}, {details['generations']} generations of up to "
            f"{details['population']} candidates, initial step size {details['initial_step']:g}")


def _fmt_number(value) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _code(text: str, in_table: bool = False) -> str:
    """``text`` as a markdown code span (fenced past any backticks it holds); in a table, ``|`` is escaped."""
    text = str(text).replace("\n", " ")
    if in_table:
        text = text.replace("|", "\\|")
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _metric_rows(result: dict) -> tuple[list[dict], list[str]]:
    learned = (result.get("learned_by") or {}).get("eval")
    stages = [("merged", result.get("eval_before") or result.get("eval")), ("fine-tuned", result.get("eval_after")),
              ("merged (measured by the search that learned α)", None if result.get("eval") else learned)]
    stages = [(s, m) for s, m in stages if m]
    names = sorted({k for _, m in stages for k in m})
    return [{"stage": s, "values": [_fmt(m.get(k, "")) for k in names]} for s, m in stages], names


def _comparison_rows(comparison: Optional[dict]) -> tuple[list[dict], list[str]]:
    if not comparison:
        return [], []
    columns = comparison["columns"]
    return [{"method": r["method"], "values": [r.get(c, "") for c in columns]} for r in comparison["rows"]], columns


def _eval_results(result: dict, task) -> Optional[list]:
    from huggingface_hub import EvalResult

    dataset = result["dataset"]
    out = []
    for stage, metrics in (("merged", result.get("eval_before") or result.get("eval")),
                           ("fine-tuned", result.get("eval_after"))):
        if not metrics or task.primary_metric not in metrics:
            continue
        out.append(EvalResult(
            task_type=task.pipeline_tag,
            dataset_type=dataset["id"],
            dataset_name=dataset["id"],
            dataset_split=dataset.get("eval_split"),
            dataset_revision=dataset.get("revision"),
            metric_type=task.primary_metric,
            metric_name=f"{task.primary_metric} ({stage})",
            metric_value=round(float(metrics[task.primary_metric]), 6),
        ))
    return out or None
