"""`hf-glue estimate`: every memory strategy's memory per device and traffic per SPSA step for a merge, from the
experts' configs and file headers (no weight is downloaded), and the strategy `merge` would pick."""

from __future__ import annotations

import dataclasses
import torch

from .config import DataConfig, EstimateConfig, ExpertsConfig, GlueConfig, torch_dtype
from .engine import memory
from .errors import GlueError

#: the merge flags that select each strategy
FLAGS = {"replicated": "--blend materialized --shard false", "sharded": "--shard", "on-the-fly": "--blend on-the-fly",
         "offload-cpu": "--offload cpu", "offload-disk": "--offload disk", "lora": "(LoRA adapters)"}


def estimate_merge(experts_config: ExpertsConfig, config: EstimateConfig) -> dict:
    """The plan of ``hf-glue merge`` with these experts on ``config.num_processes`` processes: the experts' size,
    each strategy's figures (bytes), the budget and the strategy chosen (None when nothing fits)."""
    from .io.adapters import is_adapter
    from .io.experts import check_compatible, expert_from_repo, index_without_weights, resolve_experts, resolve_repos
    from .methods import get_method
    from .pipeline import blend_dtypes, excluded_strategies, memory_budgets, memory_plans, strategy_candidates
    from .tasks import detect_task
    from .tasks.base import fit_max_length

    glue = GlueConfig(method=config.method, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                      spsa_samples=config.spsa_samples, parallel=config.parallel, combine=config.combine)
    repos = resolve_repos(experts_config.experts)
    processes = config.num_processes
    extra: dict = {}
    if any(is_adapter(r.path) for r in repos):
        from . import lora

        adapters, base, task, model_config = lora.resolve(repos, experts_config, None)
        source = index_without_weights(base, task.model_class(), experts_config.trust_remote_code)
        rows = [base]
        adapter_bytes = 4 * sum(torch.Size(s).numel() for a in adapters for s in a.shapes.values())
        extra = {"blends": False, "extra_experts": adapter_bytes, "extra_per_blend": adapter_bytes}
        exclude: dict[str, str] = {}
    else:
        experts = [expert_from_repo(r) for r in repos]
        task = detect_task(experts[0].config, None)
        check_compatible(experts, task.model_class(), experts_config.trust_remote_code)
        source = index_without_weights(experts[0], task.model_class(), experts_config.trust_remote_code)
        rows = list(experts)
        if config.combine:
            if not experts_config.base_model:
                raise GlueError("--combine plans one more row, the base: pass --base-model.")
            rows.append(resolve_experts([experts_config.base_model], what="base model", minimum=1)[0])
        model_config = experts[0].config
        exclude = excluded_strategies(experts[:1], experts_config, glue, finetune=False, whole=False)
    data = fit_max_length(DataConfig(max_length=config.max_length), model_config)
    plans = memory_plans([rows[0]] * len(rows), experts_config, data, glue, processes, **extra)
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()
                                                                 and not experts_config.cpu) else "cpu")
    if experts_config.max_memory is None and device.type == "cuda" and not torch.cuda.is_available():
        raise GlueError("--device cuda on a machine without a GPU: pass --max-memory (e.g. 80GiB) to plan for one.")
    budget, host = memory_budgets(experts_config.max_memory, device)
    candidates, exclude, allowed = strategy_candidates(plans, experts_config, glue, processes, exclude)
    chosen = memory.choose(candidates, budget, host, device.type)
    floats = [i for i in rows[0].tensors.values() if i.dtype.is_floating_point]
    dtypes = blend_dtypes(rows[0], torch_dtype(experts_config.dtype))
    tips = [] if chosen else memory.advice(candidates, device_type=device.type, dtype_is_full=dtypes == {torch.float32},
                                           samples=glue.spsa_samples, processes=processes, excluded=set(exclude),
                                           others=plans, budget=budget)
    return {
        "experts": [r.spec for r in repos],
        "parameters": sum(i.numel for i in floats),
        "expert_bytes": sum(i.numel * (torch_dtype(experts_config.dtype) or i.dtype).itemsize for i in floats),
        "dtypes": sorted({str(experts_config.dtype if experts_config.dtype != "auto" else i.dtype).replace("torch.", "")
                          for i in floats}),
        "source": source,
        "processes": processes,
        "device": device.type,
        "budget": budget,
        "host_budget": host,
        "headroom": memory.HEADROOM,
        "batch_per_process": glue.batch_size // processes if glue.parallel == "data" else glue.batch_size,
        "sequence_length": data.max_length,
        "models_per_step": get_method(glue.method).models_per_step(glue),
        "strategies": {n: {**dataclasses.asdict(p.memory), "total": p.memory.total, "host": p.host, "moved": p.moved,
                           "link": p.link, "fits": p.fits(budget, host), "flags": FLAGS[n],
                           "unavailable": exclude.get(n) or (None if n in allowed else "not allowed by the flags")}
                       for n, p in plans.items()},
        "chosen": chosen.strategy if chosen else None,
        "advice": tips,
    }


def format_estimate(report: dict) -> str:
    """The estimate as users read it: the experts, the budget, one row per strategy and the choice."""
    h = memory.human
    source = "safetensors headers" if report["source"] == "headers" else "config.json, on the meta device"
    lines = [f"{len(report['experts'])} experts × {count(report['parameters'])} parameters "
             f"({', '.join(report['dtypes'])}; sizes from {source})",
             f"{report['processes']} process(es) on {report['device']}: batch {report['batch_per_process']} × "
             f"{report['sequence_length']} tokens per process, {report['models_per_step']} blended models per "
             "SPSA step",
             f"budget {h(report['budget'])} per device, {h(report['host_budget'])} host memory per process; a "
             f"strategy fits within {report['headroom']:.0%} of it", ""]
    header = ["strategy", "per device", "experts", "blends", "activations", "host", "moved / step", "over", "fits"]
    rows = []
    for name, s in report["strategies"].items():
        fits = "no (" + s["unavailable"] + ")" if s["unavailable"] else ("yes" if s["fits"] else "no")
        rows.append([name, h(s["total"]), h(s["experts"]), h(s["blends"]), h(s["activations"]),
                     h(s["host"]) if s["host"] else "–", h(s["moved"]), s["link"], fits])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    if "sharded" not in report["strategies"]:
        lines.append("sharded: needs several processes (--num-processes N)")
    chosen = report["chosen"]
    lines.append("")
    lines.append(f"merge would use: {chosen} ({FLAGS[chosen]})" if chosen else
                 "merge would refuse: no strategy fits; try " + "; ".join(report["advice"]) + ".")
    return "\n".join(lines)


def count(n: int) -> str:
    """6738415616 → "6.74 B", 113000000 → "113 M", 21730 → "21.7 K"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)
