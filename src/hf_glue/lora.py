"""LoRA experts end to end: resolve the adapters and their base, check them against each other from small files,
then load the base once with every adapter injected (shared by `merge`, `compare` and `blend`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import ExpertsConfig, torch_dtype
from .errors import GlueError
from .io.adapters import (TASK_TYPES, Adapter, check_against_base, common_base, fetch_adapter_weights,
                          read_adapter)
from .io.experts import Expert, resolve_experts
from .io.hub import ResolvedRepo
from .tasks import Task, detect_task


def resolve(repos: Sequence[ResolvedRepo], experts_config: ExpertsConfig, task_name: Optional[str] = None
            ) -> tuple[list[Adapter], Expert, Task, dict]:
    """The adapters, their base (metadata only), the task and the config the task reads; every check that needs
    no base weights runs here: configs, a shared base, the adapters' factor shapes against the base's modules."""
    adapters = [read_adapter(r) for r in repos]
    base_spec = common_base(adapters, experts_config.base_model)
    base = resolve_experts([base_spec], what="base model", minimum=1)[0]
    task_types = {a.config.get("task_type") for a in adapters}
    # the base's own head (e.g. an LLM's LM head) is not the adapters' task: their heads come with them
    task = detect_task(base.config, task_name or (TASK_TYPES.get(task_types.pop()) if len(task_types) == 1 else None),
                       heads_from_config=False)
    fetch_adapter_weights(adapters, experts_config.allow_pickle)
    meta = _meta_model(base, task, base.config, experts_config.trust_remote_code)
    model_config = _config_for_heads(base, adapters, task, meta)
    if _label_overrides(base.config, model_config):  # another head size: the shapes come from that model
        meta = _meta_model(base, task, model_config, experts_config.trust_remote_code)
    check_against_base(adapters, base_spec, {n: tuple(t.shape) for n, t in meta.state_dict().items()})
    return adapters, base, task, model_config


def load(base: Expert, adapters: Sequence[Adapter], task: Task, model_config: dict, experts_config: ExpertsConfig,
         granularity: str, device):
    """The search model (the base with every adapter active) and the `AdapterMatrix` that blends them."""
    from .engine.adapters import build_search_model

    base_model = _load_base(base, adapters, task, model_config, experts_config, device)
    return build_search_model(base_model, adapters, granularity)


def _config_for_heads(base: Expert, adapters: Sequence[Adapter], task: Task, meta: torch.nn.Module) -> dict:
    """The base's config as the adapters use it: a classification head the adapters save with another number of
    classes than the base's config says (a base without a head) sets ``num_labels``. ``meta``: the base's model
    on the meta device, where the head is found."""
    head_module = task.head_module(meta)
    head = next((n for n, m in meta.named_modules() if m is head_module), None) if head_module is not None else None
    sizes = {a.full_tensors().get(f"{head}.weight", (None,))[0] for a in adapters} - {None} if head else set()
    if len(sizes) > 1:
        raise GlueError(f"the adapters' saved heads ({head}) have different numbers of classes ({sorted(sizes)}); "
                        "adapters merge only when they predict the same classes.")
    config = dict(base.config)
    if sizes:
        n = sizes.pop()
        if len(config.get("id2label") or {}) != n:
            config.update(num_labels=n, id2label={str(i): f"LABEL_{i}" for i in range(n)},
                          label2id={f"LABEL_{i}": i for i in range(n)})
    return config


def _meta_model(base: Expert, task: Task, model_config: dict, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.repo.path, trust_remote_code=trust_remote_code,
                                        **_label_overrides(base.config, model_config))
    with torch.device("meta"):
        return task.model_class().from_config(config, trust_remote_code=trust_remote_code)


def _label_overrides(original: dict, model_config: dict) -> dict:
    keys = ("num_labels", "id2label", "label2id")
    if all(original.get(k) == model_config.get(k) for k in keys):
        return {}
    return {"num_labels": model_config["num_labels"],
            "id2label": {int(k): v for k, v in model_config["id2label"].items()},
            "label2id": model_config["label2id"]}


def _load_base(base: Expert, adapters, task: Task, model_config: dict, experts_config: ExpertsConfig, device):
    """The base model with its weights, in the run's dtype; refuses weights it lacks unless every adapter saves them
    (a base without a classification head, adapters that each trained one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.repo.path, trust_remote_code=experts_config.trust_remote_code,
                                        **_label_overrides(base.config, model_config))
    dtype = torch_dtype(experts_config.dtype) or "auto"
    model, info = task.model_class().from_pretrained(
        base.repo.path, config=config, dtype=dtype, trust_remote_code=experts_config.trust_remote_code,
        output_loading_info=True, use_safetensors=not experts_config.allow_pickle or None)
    saved_by_all = set.intersection(*(set(a.full_tensors()) for a in adapters))
    missing = sorted(set(info.get("missing_keys") or []) - saved_by_all)
    if missing:
        raise GlueError(f"base model {base.name!r} lacks {missing[0]!r} ({len(missing)} such) and not every adapter "
                        "saves it: it would be left at random init. Pass the base the adapters were trained on "
                        "(--base-model).")
    return model.to(device).eval()
