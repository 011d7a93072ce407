"""PEFT LoRA adapters as experts: detected by ``adapter_config.json``, checked from their configs before the base
is downloaded, and read as low-rank factors (A, B per module) plus full tensors (``modules_to_save``).

An adapter k adds ΔW_k = s_k B_k A_k to the modules it targets (s_k = lora_alpha / r, or / √r with rsLoRA) and
replaces whole modules it saves (e.g. a classification head trained with it). hf-glue blends the deltas:
θ(α) = θ_base + Σ_k α_k ΔW_k, the saved modules as Σ_k α_k θ_k (the base's module where an adapter has none).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import hub
from ..errors import GlueError
from .safetensors import SafetensorsError, read_header

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
#: the prefix PEFT gives every key of a saved adapter
PEFT_PREFIX = "base_model.model."
logger = logging.getLogger(__name__)
#: ``<module>.lora_A.weight`` (linear, conv) or ``<module>.lora_embedding_A`` (embedding), A or B
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>A|B)\.weight|lora_embedding_(?P<eab>A|B))$")
#: PEFT's task types mapped to hf-glue tasks (used when --task is not given)
TASK_TYPES = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "causal-lm"}
#: adapter_config.json settings hf-glue cannot blend linearly (or does not read yet), with what they are
_UNSUPPORTED = {
    "use_dora": "DoRA (its magnitude vectors make the delta non-linear in the coefficients)",
    "lora_bias": "a LoRA bias",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
}
#: PEFT's ``bias`` setting: anything but "none" trains biases of the base, which hf-glue does not read yet
_BIAS_NONE = "none"


@dataclass
class LoraFactors:
    """One adapter's factors for one module: ΔW ∝ B @ A (``embedding``: A is [r, vocab], B is [dim, r]); the scale
    s = lora_alpha / r (or / √r) is PEFT's, read from the layer it builds."""

    a: torch.Tensor
    b: torch.Tensor
    embedding: bool = False


@dataclass
class Adapter:
    """One resolved adapter: its pinned snapshot, parsed ``adapter_config.json`` and (after fetch) its weight file."""

    repo: hub.ResolvedRepo
    config: dict
    file: Optional[Path] = None
    #: tensor names and shapes from the weight file's header (after fetch), in PEFT's saved key space
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.repo.spec

    @property
    def base(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Targeted modules (base-model names) → ``{"A": shape, "B": shape}``, from the weight header."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in self.shapes.items():
            match = _LORA_KEY.match(key[len(PEFT_PREFIX):])
            if match:
                out.setdefault(match["module"], {})[match["ab"] or match["eab"]] = shape
        return out

    def full_tensors(self) -> dict[str, tuple[int, ...]]:
        """Whole tensors the adapter saves (``modules_to_save``), by base-model name → shape."""
        return {key[len(PEFT_PREFIX):]: shape for key, shape in self.shapes.items()
                if not _LORA_KEY.match(key[len(PEFT_PREFIX):])}

    def read(self) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
        """The factors of every targeted module and the saved whole tensors, both by base-model name."""
        if self.file is None:
            raise RuntimeError(f"adapter {self.name!r}: weights not fetched")
        if self.file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(self.file)
        else:
            state = torch.load(self.file, map_location="cpu", weights_only=True)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        full: dict[str, torch.Tensor] = {}
        embedding: set[str] = set()
        for key, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise GlueError(f"adapter {self.name!r}: tensor {key!r} holds NaN or inf values; refusing to merge it.")
            name = key[len(PEFT_PREFIX):]
            match = _LORA_KEY.match(name)
            if match is None:
                full[name] = tensor
                continue
            factors.setdefault(match["module"], {})[match["ab"] or match["eab"]] = tensor
            if match["eab"]:
                embedding.add(match["module"])
        return {m: LoraFactors(ab["A"], ab["B"], m in embedding) for m, ab in factors.items()}, full


def is_adapter(path: Path) -> bool:
    """Whether a resolved folder holds a PEFT adapter (rather than a full checkpoint)."""
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter(repo: hub.ResolvedRepo) -> Adapter:
    """Parse and check ``adapter_config.json``: a LoRA adapter hf-glue can blend, or one clear error."""
    path = repo.path / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise GlueError(f"adapter {repo.spec!r}: cannot read {ADAPTER_CONFIG} ({err}); re-save it with PEFT's "
                        "save_pretrained.") from None
    if not isinstance(config, dict):
        raise GlueError(f"adapter {repo.spec!r}: {ADAPTER_CONFIG} holds a {type(config).__name__}, not a JSON object.")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise GlueError(f"adapter {repo.spec!r} is a {kind!r} adapter; hf-glue blends LoRA adapters (peft_type LORA).")
    if config.get("bias", _BIAS_NONE) != _BIAS_NONE:
        raise GlueError(f"adapter {repo.spec!r} trains the base's biases (bias={config['bias']!r} in "
                        f"{ADAPTER_CONFIG}), which hf-glue cannot blend yet; merge adapters trained with bias='none'.")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise GlueError(f"adapter {repo.spec!r} uses {what} ({key} in {ADAPTER_CONFIG}), which hf-glue cannot "
                            "blend yet; merge plain LoRA adapters.")
    return Adapter(repo=repo, config=config)


def common_base(adapters: Sequence[Adapter], base_model: Optional[str]) -> str:
    """The base the adapters share: ``--base-model`` when given, else the one their configs name; adapters that
    name different bases are refused (before anything is downloaded)."""
    named = {a.name: a.base for a in adapters}
    if base_model:
        others = sorted({b for b in named.values() if b and b != base_model})
        if others:
            logger.warning("note: the adapters name %s as their base; using --base-model %s instead", ", ".join(
                repr(b) for b in others), base_model)
        return base_model
    missing = [n for n, b in named.items() if not b]
    if missing:
        raise GlueError(f"adapter {missing[0]!r} does not name its base model (base_model_name_or_path in "
                        f"{ADAPTER_CONFIG}); pass --base-model REPO_OR_FOLDER.")
    bases = sorted(set(named.values()))
    if len(bases) > 1:
        by_base = {b: next(n for n, nb in named.items() if nb == b) for b in bases}
        listed = "; ".join(f"{n!r} over {b!r}" for b, n in by_base.items())
        raise GlueError(f"the adapters were trained over different base models ({listed}): adapters merge only "
                        "over one base. If these name the same model, pass --base-model.")
    return bases[0]


def fetch_adapter_weights(adapters: Sequence[Adapter], allow_pickle: bool = False) -> None:
    """Download each adapter's weight file (small) and index its header; pickled weights need ``allow_pickle``."""
    for adapter in adapters:
        path = hub.download(adapter.repo, (SAFE_WEIGHTS, PICKLE_WEIGHTS) if allow_pickle else (SAFE_WEIGHTS,),
                            what="adapter")
        if (path / SAFE_WEIGHTS).is_file():
            adapter.file = path / SAFE_WEIGHTS
            try:
                header, _ = read_header(adapter.file)
            except (OSError, SafetensorsError) as err:
                raise GlueError(f"adapter {adapter.name!r}: cannot read {SAFE_WEIGHTS}: {err}") from None
            adapter.shapes = {k: e.shape for k, e in header.items()}
        elif allow_pickle and (path / PICKLE_WEIGHTS).is_file():
            adapter.file = path / PICKLE_WEIGHTS
            state = torch.load(adapter.file, map_location="cpu", weights_only=True, mmap=True)
            adapter.shapes = {k: tuple(t.shape) for k, t in state.items()}
        else:
            pickled = hub.download(adapter.repo, (PICKLE_WEIGHTS,), what="adapter") if not allow_pickle else path
            found = " (found adapter_model.bin)" if (pickled / PICKLE_WEIGHTS).is_file() else ""
            raise GlueError(f"adapter {adapter.name!r} has no {SAFE_WEIGHTS}{found}: convert it to safetensors, or "
                            "pass --allow-pickle to load pickled weights (this runs pickle: only for repos you trust).")
        bad = sorted(k for k in adapter.shapes if not k.startswith(PEFT_PREFIX))
        if bad:
            raise GlueError(f"adapter {adapter.name!r}: {adapter.file.name} holds {bad[0]!r}, not a PEFT key "
                            f"({PEFT_PREFIX}...); was it saved with PEFT's save_pretrained?")
        if not adapter.modules():
            raise GlueError(f"adapter {adapter.name!r}: {adapter.file.name} holds no LoRA weights (lora_A / lora_B).")


def check_against_base(adapters: Sequence[Adapter], base_name: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse an adapter whose modules or saved tensors do not fit the base (``shapes``: the base model's state
    names → shapes, from its config on the meta device), naming the adapter, module and shapes."""
    for adapter in adapters:
        for module, ab in adapter.modules().items():
            weight = shapes.get(f"{module}.weight")
            if weight is None:
                raise GlueError(f"adapter {adapter.name!r} targets {module!r}, which base model {base_name!r} does "
                                "not have: is it an adapter of another base? (pass --base-model to name its base)")
            if "A" not in ab or "B" not in ab:
                lacking = "B" if "A" in ab else "A"
                raise GlueError(f"adapter {adapter.name!r}: module {module!r} lacks its lora_{lacking} weight.")
            a, b = ab["A"], ab["B"]
            transposed = adapter.config.get("fan_in_fan_out")  # Conv1D-style weights: [in, out]
            out_dim, in_dim = (weight[1], weight[0]) if transposed else (weight[0], weight[1] if len(weight) > 1 else 1)
            if len(weight) == 2 and b[0] != out_dim and not _embedding_fits(a, b, weight):
                raise GlueError(f"adapter {adapter.name!r}: module {module!r} has lora_B of shape {list(b)} but base "
                                f"model {base_name!r}'s weight is {list(weight)}: it is an adapter of another base "
                                "(or size).")
            if len(weight) == 2 and a[-1] != in_dim and not _embedding_fits(a, b, weight):
                raise GlueError(f"adapter {adapter.name!r}: module {module!r} has lora_A of shape {list(a)} but base "
                                f"model {base_name!r}'s weight is {list(weight)}: it is an adapter of another base "
                                "(or size).")
        for name, shape in adapter.full_tensors().items():
            expected = shapes.get(name)
            if expected is None:
                raise GlueError(f"adapter {adapter.name!r} saves tensor {name!r}, which base model {base_name!r} "
                                "does not have: is it an adapter of another base?")
            if tuple(expected) != tuple(shape):
                raise GlueError(f"adapter {adapter.name!r}: saved tensor {name!r} has shape {list(shape)} but base "
                                f"model {base_name!r}'s is {list(expected)}.")


def _embedding_fits(a: tuple, b: tuple, weight: tuple) -> bool:
    """An embedding's LoRA: A is [r, vocab], B is [dim, r] against a [vocab, dim] weight."""
    return len(a) == 2 and len(b) == 2 and a[1] == weight[0] and b[0] == weight[1]
