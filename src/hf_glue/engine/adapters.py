"""Blending LoRA adapters without a dense ΔW: θ(α) = θ_base + Σ_k α_k s_k B_k A_k.

The K adapters of a module are one rank-concatenated LoRA branch: A = [s_k A_k]_k stacked, B = [B_k]_k side by
side, scaling 1, so B A = Σ_k s_k B_k A_k (PEFT's ``add_weighted_adapter(..., combination_type="cat")``). The
search model is the base, loaded once, with that branch injected by PEFT; a blend scales the rows of adapter k
in A by its α (per group), and blends the whole tensors adapters save (``modules_to_save``, e.g. a classification
head) like full experts. Both enter the model through ``functional_call`` exactly as `ExpertMatrix` blends do, so
every method works unchanged. A forward pass costs two dense products of rank Σ r_k per module, not K small
branches; memory is the base once, the K adapters, and 2q scaled copies of the A factors — never K models, never
a dense ΔW. Modules some adapters do not touch have zero rows there; every module is padded with zeros to the
largest total rank (exact: zeros add nothing).

The learned blend is saved as that same branch with its A scaled (one LoRA adapter that is exactly the blend), or
folded into the base (``merge_and_unload``): a plain transformers model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import GlueError
from ..io.adapters import PEFT_PREFIX, Adapter, LoraFactors
from .matrix import CoefficientLayout, ExpertMatrix, _order_groups, group_of

#: the name of the concatenated branch inside the search model (PEFT saves an adapter called "default" at the root)
BRANCH = "default"


@dataclass(frozen=True)
class _Module:
    """One adapted module: its concatenated A (a slice of the flat factor buffer), group, and which rows of A belong
    to which adapter (``owner[row]`` = k, or K for padding rows, whose coefficient is 0)."""

    name: str
    param: str
    group: int
    offset: int
    shape: tuple[int, ...]
    owner: torch.Tensor
    embedding: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class AdapterMatrix(CoefficientLayout):
    """K adapters ready to blend: every module's concatenated A factors (each adapter's rows already scaled by its
    s_k) in one flat buffer that the model's parameters are views of, and the saved whole tensors as an
    `ExpertMatrix`."""

    def __init__(self, expert_names: Sequence[str], groups: Sequence[str], factors: torch.Tensor,
                 modules: list[_Module], heads: Optional[ExpertMatrix], model: torch.nn.Module) -> None:
        self.expert_names = list(expert_names)
        self.groups = list(groups)
        self.factors = factors
        self.modules = modules
        self.heads = heads
        self.model = model
        self._device = factors.device
        self._group_sizes = torch.zeros(len(self.groups), dtype=torch.float64)
        for m in modules:
            self._group_sizes[m.group] += 2 * m.numel  # A, and B of about the same size
        if heads is not None:
            self._group_sizes += heads.group_sizes()
        self._outputs: Optional[torch.Tensor] = None
        self._views: list[dict[str, torch.Tensor]] = []
        self._head_views: Optional[list] = None

    @property
    def model_dtype(self) -> torch.dtype:
        return next(p.dtype for n, p in self.model.named_parameters() if "lora_" not in n)

    @property
    def search_dtype(self) -> torch.dtype:
        """The base runs in its own dtype; the blended low-rank branches are PEFT's float32 factors."""
        return self.model_dtype

    def _row_scales(self, alpha: torch.Tensor) -> list[torch.Tensor]:
        """Per module, the coefficient of each row of its A: α[group, owner] (0 for padding rows)."""
        padded = torch.cat([alpha, alpha.new_zeros(alpha.shape[0], 1)], 1).to(self.factors.dtype)  # [G, K + 1]
        return [padded[m.group].index_select(0, m.owner) for m in self.modules]

    def _scaled(self, m: _Module, scale: torch.Tensor) -> torch.Tensor:
        a = self.factors[m.offset: m.offset + m.numel].view(m.shape)
        return a * scale.view(-1, *[1] * (a.dim() - 1))

    def blend(self, alphas: torch.Tensor, *, rounded: bool = False) -> list[dict[str, torch.Tensor]]:
        """For each of M coefficient sets ``alphas[M, G, K]``: every module's A with adapter k's rows scaled by
        α_k (of the module's group) and the blended saved tensors, by search-model parameter name (views of reused
        buffers without grad, as `ExpertMatrix.blend`)."""
        if alphas.dim() == 2:
            alphas = alphas.unsqueeze(0)
        alphas = alphas.to(self.device)
        m_sets = alphas.shape[0]
        heads = self.heads.blend(alphas, rounded=rounded) if self.heads is not None else [{} for _ in range(m_sets)]
        if torch.is_grad_enabled() and alphas.requires_grad:
            out = []
            for i in range(m_sets):
                views = dict(heads[i])
                for m, scale in zip(self.modules, self._row_scales(alphas[i])):
                    views[m.param] = self._scaled(m, scale)
                out.append(views)
            return out
        self._reserve(m_sets, heads)
        with torch.no_grad():
            for i in range(m_sets):
                row = self._outputs[i]
                for m, scale in zip(self.modules, self._row_scales(alphas[i])):
                    a = self.factors[m.offset: m.offset + m.numel].view(m.shape)
                    torch.mul(a, scale.view(-1, *[1] * (a.dim() - 1)),
                              out=row[m.offset: m.offset + m.numel].view(m.shape))
        return self._views[:m_sets]

    def release(self, experts: bool = False) -> None:
        """Free the product buffers (with ``experts``: the saved tensors' rows too; the factors live in the model)."""
        self._outputs, self._views, self._head_views = None, [], None
        if self.heads is not None:
            self.heads.release(experts)

    def _reserve(self, m: int, heads: list[dict]) -> None:
        if self._outputs is None or m > self._outputs.shape[0]:
            self._outputs = torch.empty(m, self.factors.numel(), dtype=self.factors.dtype, device=self.device)
            self._head_views = None
        seen = self._head_views
        if seen is None or len(heads) > len(seen) or any(a is not b for a, b in zip(heads, seen)):
            # the product or the heads' buffers moved (or were never seen): rebuild the name → view dicts
            self._views = []
            for i, row in enumerate(self._outputs.unbind(0)):
                views = dict(heads[i]) if i < len(heads) else {}
                for mod in self.modules:
                    views[mod.param] = row[mod.offset: mod.offset + mod.numel].view(mod.shape)
                self._views.append(views)
            self._head_views = list(heads)

    # -- the learned blend as one adapter --------------------------------------------------------------------
    def cat_state(self, alpha: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
        """The blend ``alpha[G, K]`` as one LoRA adapter: its config fields and state dict in PEFT's saved key
        format (the search branch with A scaled, B as it is, scaling 1)."""
        alpha = alpha.detach().reshape(self.num_groups, self.num_experts).to(torch.float64).to(self.device)
        state: dict[str, torch.Tensor] = {}
        inner = self.model.base_model.model
        for m, scale in zip(self.modules, self._row_scales(alpha)):
            layer = inner.get_submodule(m.name)
            a = self._scaled(m, scale).detach().cpu().contiguous()
            if m.embedding:
                state[f"{PEFT_PREFIX}{m.name}.lora_embedding_A"] = a
                state[f"{PEFT_PREFIX}{m.name}.lora_embedding_B"] = layer.lora_embedding_B[BRANCH].detach().cpu()
            else:
                state[f"{PEFT_PREFIX}{m.name}.lora_A.weight"] = a
                state[f"{PEFT_PREFIX}{m.name}.lora_B.weight"] = layer.lora_B[BRANCH].weight.detach().cpu()
        heads = []
        if self.heads is not None:
            for name, tensor in self.heads.materialize(alpha).items():
                state[name] = tensor.cpu()  # search-model names: base_model.model.<name>
                heads.append(name[len(PEFT_PREFIX):].rsplit(".", 1)[0])
        rank = self.modules[0].shape[0]
        fields = {"r": rank, "lora_alpha": rank, "target_modules": sorted(m.name for m in self.modules),
                  "modules_to_save": sorted(set(heads)) or None, "use_rslora": False, "rank_pattern": {},
                  "alpha_pattern": {}, "lora_dropout": 0.0}
        return fields, state

    def to_adapter_model(self, alpha: torch.Tensor, base_config: dict, consume: bool = True):
        """A `PeftModel`: the base with one adapter named ``default`` that is exactly the blend ``alpha``.

        ``consume``: strip the search branch from the search model and reuse its base weights (no copy; the search
        model is unusable afterwards); otherwise the base is copied first.
        """
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict

        fields, state = self.cat_state(alpha)
        self.release()
        search = self.model if consume else copy.deepcopy(self.model)
        reference = search.peft_config[BRANCH]
        base = search.unload()
        if consume:
            self.factors, self.model = self.factors.new_empty(0), None
        config = LoraConfig(**{**base_config, **fields, "task_type": reference.task_type,
                               "fan_in_fan_out": reference.fan_in_fan_out, "inference_mode": True,
                               "init_lora_weights": False})
        model = PeftModel(base, config)
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if result.unexpected_keys or missing:
            raise GlueError(f"internal: the blended adapter did not load into PEFT "
                            f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}).")
        model.eval()
        return model


def lora_scale(adapter: Adapter, module: str, rank: int) -> float:
    """s = lora_alpha / r (or / √r with rsLoRA), with the per-module ``alpha_pattern`` resolved as PEFT does."""
    from peft.utils.other import get_pattern_key

    patterns = adapter.config.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), module), adapter.config.get("lora_alpha", 8)))
    return alpha / (math.sqrt(rank) if adapter.config.get("use_rslora") else rank)


def build_search_model(base: torch.nn.Module, adapters: Sequence[Adapter], granularity: str
                       ) -> tuple[torch.nn.Module, "AdapterMatrix"]:
    """Inject the adapters' rank-concatenated branch into ``base`` (a loaded transformers model), load its factors
    and return the model with the `AdapterMatrix` that blends them."""
    from peft import LoraConfig, PeftModel

    read = [adapter.read() for adapter in adapters]
    transposed = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(transposed) > 1:
        raise GlueError("the adapters disagree on fan_in_fan_out (one was made for another model class).")
    by_module: dict[str, list[tuple[int, LoraFactors, float]]] = {}
    for k, (adapter, (factors, _)) in enumerate(zip(adapters, read)):
        for module, lora in factors.items():
            by_module.setdefault(module, []).append((k, lora, lora_scale(adapter, module, lora.a.shape[0])))
    rank = max(sum(lora.a.shape[0] for _, lora, _ in entries) for entries in by_module.values())
    fields = {key: v for key, v in adapters[0].config.items() if key in LoraConfig.__dataclass_fields__}
    config = LoraConfig(**{**fields, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
                           "alpha_pattern": {}, "lora_dropout": 0.0, "modules_to_save": None,
                           "inference_mode": True, "init_lora_weights": False, "target_modules": sorted(by_module),
                           "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None})
    try:
        model = PeftModel(base, config, adapter_name=BRANCH)
    except (ValueError, RuntimeError) as err:
        raise GlueError(f"the adapters do not fit the base model: {err}") from None
    model.eval()
    model.requires_grad_(False)
    inner = model.base_model.model
    device = next(base.parameters()).device

    group_names = {m: group_of(f"{m}.weight", granularity) for m in by_module}
    group_names.update({n: group_of(n, granularity) for _, full in read for n in full})
    groups = _order_groups(list(dict.fromkeys(group_names.values())))
    index = {g: i for i, g in enumerate(groups)}

    parameters = dict(model.named_parameters())
    names = sorted(by_module, key=lambda m: index[group_names[m]])
    embedding = {m: by_module[m][0][1].embedding for m in names}
    params = {m: f"{PEFT_PREFIX}{m}." + ("lora_embedding_A." + BRANCH if embedding[m] else f"lora_A.{BRANCH}.weight")
              for m in names}
    dtype = parameters[params[names[0]]].dtype  # PEFT holds adapters in float32 over a half-precision base
    sizes = [math.prod(parameters[params[m]].shape) for m in names]
    factors = torch.zeros(sum(sizes), dtype=dtype, device=device)
    modules, offset = [], 0
    for m, size in zip(names, sizes):
        layer = inner.get_submodule(m)
        a_param = parameters[params[m]]
        b_param = layer.lora_embedding_B[BRANCH] if embedding[m] else layer.lora_B[BRANCH].weight
        a = factors[offset: offset + size].view(a_param.shape)
        b = torch.zeros_like(b_param)
        owner = torch.full((rank,), len(adapters), dtype=torch.long)
        row = 0
        for k, lora, scale in by_module[m]:
            r = lora.a.shape[0]
            if tuple(lora.a.shape[1:]) != tuple(a.shape[1:]) or tuple(lora.b.shape[:1] + lora.b.shape[2:]) != \
                    tuple(b.shape[:1] + b.shape[2:]):
                raise GlueError(f"adapter {adapters[k].name!r}: module {m!r} has factors of shapes "
                                f"{list(lora.a.shape)}, {list(lora.b.shape)}, which do not fit the base's module.")
            a[row: row + r].copy_(lora.a.to(torch.float64) * scale)
            b[:, row: row + r].copy_(lora.b)
            owner[row: row + r] = k
            row += r
        a_param.data = a  # the model's A is a view of the flat buffer: held once
        b_param.data = b
        modules.append(_Module(m, params[m], index[group_names[m]], offset, tuple(a.shape), owner.to(device),
                               embedding[m]))
        offset += size

    heads = None
    head_names = sorted({name for _, full in read for name in full})
    if head_names:
        base_state = dict(inner.named_parameters())
        base_state.update(dict(inner.named_buffers()))
        head_rows = []  # on the CPU: from_rows copies them into its one device buffer
        for factors_k, full in read:
            head_rows.append({f"{PEFT_PREFIX}{n}": (full[n] if n in full else base_state[n].detach().cpu())
                              .to(dtype=base_state[n].dtype) for n in head_names})
        heads = ExpertMatrix.from_rows([a.name for a in adapters], head_rows, groups,
                                       {f"{PEFT_PREFIX}{n}": index[group_names[n]] for n in head_names}, device)
        heads.keep_dtype = True  # the PEFT base runs in its own dtype: its heads' blends must match it
    return model, AdapterMatrix([a.name for a in adapters], groups, factors, modules, heads, model)
