"""Blending LoRA adapters without a dense ΔW: θ(α) = θ_base + Σ_k α_k s_k B_k A_k.

The search model is the base, loaded once, with all K adapters injected and active (PEFT's multi-adapter LoRA
layers sum the K branches). A blend scales each adapter's A factors by its α (per group) and blends the whole
tensors adapters save (``modules_to_save``, e.g. a classification head) like full experts; both enter the model
through ``functional_call`` exactly as `ExpertMatrix` blends do, so every method works unchanged. Memory: the base
once, the K adapters, and 2q scaled copies of the A factors — never K models, never a dense ΔW.

The learned blend is saved as one LoRA adapter that represents it exactly (rank concatenation, as PEFT's
``add_weighted_adapter(..., combination_type="cat")``: A = [α_k s_k A_k]_k stacked, B = [B_k]_k side by side,
scaling 1), or with that adapter folded into the base (``merge_and_unload``): a plain transformers model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import GlueError
from ..io.adapters import PEFT_PREFIX, Adapter
from .matrix import ExpertMatrix, _order_groups, group_of


@dataclass(frozen=True)
class _Factor:
    """One adapter's A factor of one module: its parameter name in the search model and place in the flat row."""

    module: str
    param: str
    group: int
    offset: int
    shape: tuple[int, ...]
    embedding: bool

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class AdapterMatrix:
    """K adapters ready to blend: each adapter's A factors in one flat row (the model's parameters are views of it,
    so nothing is held twice), laid out group by group, and the saved whole tensors as an `ExpertMatrix`."""

    def __init__(self, expert_names: Sequence[str], groups: Sequence[str], rows: list[torch.Tensor],
                 factors: list[list[_Factor]], heads: Optional[ExpertMatrix], model: torch.nn.Module) -> None:
        self.expert_names = list(expert_names)
        self.groups = list(groups)
        self.rows = rows
        self.factors = factors
        self.heads = heads
        self.model = model
        self._device = rows[0].device
        # per adapter: (group, lo, hi) column ranges of its flat row, one product each
        self.segments: list[list[tuple[int, int, int]]] = []
        for row in factors:
            segs: list[tuple[int, int, int]] = []
            for f in row:
                if segs and segs[-1][0] == f.group:
                    segs[-1] = (f.group, segs[-1][1], f.offset + f.numel)
                else:
                    segs.append((f.group, f.offset, f.offset + f.numel))
            self.segments.append(segs)
        self._group_sizes = torch.zeros(len(self.groups), dtype=torch.float64)
        for k, row in enumerate(factors):
            for f in row:
                b = self._lora(f.module, k)[1]
                self._group_sizes[f.group] += f.numel + b.numel()
        if heads is not None:
            self._group_sizes += heads.group_sizes()
        self._outputs: list[list[torch.Tensor]] = []
        self._views: list[dict[str, torch.Tensor]] = []
        self._head_views: Optional[list] = None

    # -- the interface methods and results use (shared with ExpertMatrix) --------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model_dtype(self) -> torch.dtype:
        return next(p.dtype for n, p in self.model.named_parameters() if "lora_" not in n)

    def group_sizes(self) -> torch.Tensor:
        return self._group_sizes

    summarize = ExpertMatrix.summarize
    by_group = ExpertMatrix.by_group

    def blend(self, alphas: torch.Tensor, *, exact: bool = False) -> list[dict[str, torch.Tensor]]:
        """For each of M coefficient sets ``alphas[M, G, K]``: the scaled A factors and blended saved tensors, by
        search-model parameter name (views of reused buffers without grad, as `ExpertMatrix.blend`)."""
        if alphas.dim() == 2:
            alphas = alphas.unsqueeze(0)
        alphas = alphas.to(self.device)
        m = alphas.shape[0]
        heads = self.heads.blend(alphas, exact=exact) if self.heads is not None else [{} for _ in range(m)]
        if torch.is_grad_enabled() and alphas.requires_grad:
            out = []
            for i in range(m):
                views = dict(heads[i])
                for k, (row, segs) in enumerate(zip(self.rows, self.segments)):
                    parts = [row[lo:hi] * alphas[i, g, k].to(row.dtype) for g, lo, hi in segs]
                    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
                    for f in self.factors[k]:
                        views[f.param] = flat[f.offset: f.offset + f.numel].view(f.shape)
                out.append(views)
            return out
        self._reserve(m, heads)
        with torch.no_grad():
            for i in range(m):
                for k, (row, segs) in enumerate(zip(self.rows, self.segments)):
                    for g, lo, hi in segs:
                        torch.mul(row[lo:hi], alphas[i, g, k].to(row.dtype), out=self._outputs[i][k][lo:hi])
        return self._views[:m]

    def release(self, experts: bool = False) -> None:
        """Free the product buffers (with ``experts``: the saved tensors' rows too; the factors live in the model)."""
        self._outputs, self._views, self._head_views = [], [], None
        if self.heads is not None:
            self.heads.release(experts)

    def _reserve(self, m: int, heads: list[dict]) -> None:
        if m > len(self._outputs):
            self._outputs = [[torch.empty_like(row) for row in self.rows] for _ in range(m)]
            self._head_views = None
        seen = self._head_views
        if seen is None or len(heads) > len(seen) or any(a is not b for a, b in zip(heads, seen)):
            # the heads' buffers moved (or were never seen): rebuild the views
            self._views = []
            for i, bufs in enumerate(self._outputs):
                views = dict(heads[i]) if i < len(heads) else {}
                for k, buf in enumerate(bufs):
                    for f in self.factors[k]:
                        views[f.param] = buf[f.offset: f.offset + f.numel].view(f.shape)
                self._views.append(views)
            self._head_views = list(heads)

    def _lora(self, module: str, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) of adapter k at ``module`` in the search model."""
        layer = self.model.base_model.model.get_submodule(module)
        name = adapter_name(k)
        if name in layer.lora_A:
            return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name], float(layer.scaling[name])

    # -- the learned blend as one adapter --------------------------------------------------------------------
    def cat_state(self, alpha: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
        """The blend ``alpha[G, K]`` as one LoRA adapter: its config fields and state dict in PEFT's saved key
        format. Per module A = [α_k s_k A_k] stacked over the adapters touching it, B = [B_k] side by side,
        scaling 1; modules of lower total rank are zero-padded to the largest (exact: zeros add nothing)."""
        alpha = alpha.detach().reshape(self.num_groups, self.num_experts).to(torch.float64).cpu()
        modules: dict[str, list[tuple[int, _Factor]]] = {}
        for k, row in enumerate(self.factors):
            for f in row:
                modules.setdefault(f.module, []).append((k, f))
        stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, entries in modules.items():
            a_parts, b_parts = [], []
            for k, f in entries:
                a, b, scale = self._lora(module, k)
                a_parts.append(a.detach().double() * (float(alpha[f.group, k]) * scale))
                b_parts.append(b.detach().double())
            stacked[module] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
        rank = max(a.shape[0] for a, _ in stacked.values())
        state: dict[str, torch.Tensor] = {}
        embedding = {f.module for row in self.factors for f in row if f.embedding}
        for module, (a, b) in stacked.items():
            pad = rank - a.shape[0]
            if pad:
                a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], 1)
            dtype = self.rows[0].dtype
            if module in embedding:
                state[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = a.to(dtype).contiguous()
                state[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = b.to(dtype).contiguous()
            else:
                state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
                state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
        heads = []
        if self.heads is not None:
            for name, tensor in self.heads.materialize(alpha).items():
                state[name] = tensor.cpu()  # search-model names: base_model.model.<name>
                heads.append(name[len(PEFT_PREFIX):].rsplit(".", 1)[0])
        fields = {"r": rank, "lora_alpha": rank, "target_modules": sorted(modules),
                  "modules_to_save": sorted(set(heads)) or None, "use_rslora": False, "rank_pattern": {},
                  "alpha_pattern": {}, "lora_dropout": 0.0}
        return fields, state

    def to_adapter_model(self, alpha: torch.Tensor, base_config: dict, consume: bool = True):
        """A `PeftModel`: the base with one adapter named ``default`` that is exactly the blend ``alpha``.

        ``consume``: strip the experts' adapters from the search model and reuse its base weights (no copy; the
        search model is unusable afterwards); otherwise the base is copied first.
        """
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict

        fields, state = self.cat_state(alpha)
        self.release()
        search = self.model if consume else copy.deepcopy(self.model)
        reference = search.peft_config[adapter_name(0)]
        base = search.unload()
        if consume:
            self.rows, self.model = [], None
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


def adapter_name(k: int) -> str:
    """The name expert k's adapter has inside the search model."""
    return f"e{k}"


def build_search_model(base: torch.nn.Module, adapters: Sequence[Adapter], granularity: str
                       ) -> tuple[torch.nn.Module, AdapterMatrix]:
    """Inject every adapter into ``base`` (a loaded transformers model) under its own name, load its factors,
    activate them all at once and return the model with the `AdapterMatrix` that blends them."""
    from peft import LoraConfig, PeftModel

    model = None
    read = []
    for k, adapter in enumerate(adapters):
        factors, full = adapter.read()
        read.append((factors, full))
        fields = {key: v for key, v in adapter.config.items() if key in LoraConfig.__dataclass_fields__}
        config = LoraConfig(**{**fields, "modules_to_save": None, "inference_mode": True,
                               "init_lora_weights": False, "target_modules": sorted(factors),
                               "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None})
        try:
            if model is None:
                model = PeftModel(base, config, adapter_name=adapter_name(k))
            else:
                model.add_adapter(adapter_name(k), config)
        except (ValueError, RuntimeError) as err:
            raise GlueError(f"adapter {adapter.name!r} does not fit the base model: {err}") from None
    model.base_model.set_adapter([adapter_name(k) for k in range(len(adapters))], inference_mode=True)
    model.eval()
    model.requires_grad_(False)
    device = next(base.parameters()).device

    group_names: dict[str, str] = {}
    for factors, full in read:
        for module in factors:
            group_names[module] = group_of(f"{module}.weight", granularity)
        for name in full:
            group_names[name] = group_of(name, granularity)
    groups = _order_groups(list(dict.fromkeys(group_names.values())))
    index = {g: i for i, g in enumerate(groups)}

    rows: list[torch.Tensor] = []
    factor_rows: list[list[_Factor]] = []
    parameters = dict(model.named_parameters())
    for k, (adapter, (factors, _)) in enumerate(zip(adapters, read)):
        name = adapter_name(k)
        entries, offset = [], 0
        for module in sorted(factors, key=lambda m: index[group_names[m]]):
            lora = factors[module]
            param = f"{PEFT_PREFIX}{module}." + (f"lora_A.{name}.weight" if not lora.embedding
                                                 else f"lora_embedding_A.{name}")
            entries.append(_Factor(module, param, index[group_names[module]], offset, tuple(lora.a.shape),
                                   lora.embedding))
            offset += lora.a.numel()
            if param not in parameters:
                raise GlueError(f"internal: PEFT did not build {param!r} for adapter {adapter.name!r}.")
        # the factors in the dtype PEFT holds adapters in (float32 over a half-precision base), whatever the file's
        dtype = parameters[entries[0].param].dtype if entries else torch.float32
        row = torch.empty(offset, dtype=dtype, device=device)
        for f in entries:
            lora = factors[f.module]
            layer = model.base_model.model.get_submodule(f.module)
            a_param = layer.lora_embedding_A[name] if f.embedding else layer.lora_A[name].weight
            b_param = layer.lora_embedding_B[name] if f.embedding else layer.lora_B[name].weight
            if a_param.dtype != dtype:
                raise GlueError(f"adapter {adapter.name!r}: PEFT holds its factors in several dtypes.")
            if tuple(a_param.shape) != f.shape or tuple(b_param.shape) != tuple(lora.b.shape):
                raise GlueError(f"adapter {adapter.name!r}: module {f.module!r} has factors of shapes "
                                f"{list(lora.a.shape)}, {list(lora.b.shape)} but PEFT built {list(a_param.shape)}, "
                                f"{list(b_param.shape)} from its config (rank or base mismatch).")
            view = row[f.offset: f.offset + f.numel].view(f.shape)
            view.copy_(lora.a)
            a_param.data = view  # the model's A is a view of the flat row: held once
            b_param.data = lora.b.to(device=device, dtype=b_param.dtype)
        rows.append(row)
        factor_rows.append(entries)

    heads = None
    head_names = sorted({name for _, full in read for name in full})
    if head_names:
        base_state = dict(model.base_model.model.named_parameters())
        base_state.update(dict(model.base_model.model.named_buffers()))
        head_rows = []  # on the CPU: from_rows copies them into its one device buffer
        for factors, full in read:
            head_rows.append({f"{PEFT_PREFIX}{n}": (full[n] if n in full else base_state[n].detach().cpu())
                              .to(dtype=base_state[n].dtype) for n in head_names})
        heads = ExpertMatrix.from_rows([a.name for a in adapters], head_rows, groups,
                                       {f"{PEFT_PREFIX}{n}": index[group_names[n]] for n in head_names}, device)
    return model, AdapterMatrix([a.name for a in adapters], groups, rows, factor_rows, heads, model)
