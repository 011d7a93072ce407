"""The learned blend as a mergekit merge configuration (``mergekit_config.yml``), so that mergekit users can
reproduce or extend it with ``mergekit-yaml mergekit_config.yml OUT``.

Written for mergekit 0.1.5's schema (``mergekit/config.py``, ``merge_methods/``):

- full experts: ``merge_method: linear`` with each expert's ``weight`` = its α and ``normalize: false`` (α is used
  as is, whatever its sum); θ = Σ_k α_k θ_k is mergekit's linear merge exactly;
- task vectors (``--combine``): mergekit's ``task_arithmetic`` / ``ties`` / ``dare_linear`` / ``dare_ties`` with
  the base as ``base_model``, ``weight`` = λ_k, ``density``, ``normalize: false`` and ``lambda: 1``
  (`engine/task_vectors.py`). Exact for task arithmetic, and for TIES when each group's λ is a positive multiple of
  the weights hf-glue elected signs with (hand-set ``--method weights``, uniform λ); otherwise mergekit elects
  with λ itself, and DARE draws its masks (and rescales) differently: the file says so in a comment;
- LoRA adapters: each expert is ``BASE+ADAPTER`` (mergekit folds the adapter into the base with PEFT), weight α_k.
  Σ_k α_k (W + ΔW_k) equals hf-glue's W + Σ_k α_k ΔW_k when Σ_k α_k = 1 (the simplex, the default); otherwise
  the base itself is added with weight 1 − Σ_k α_k, which makes it exact for any α.

Models are referenced as ``repo@revision`` (pinned) when they came from the Hub, by the path given otherwise
(mergekit's structured form when a name holds ``@`` or ``+``, which its string syntax splits on).

Granularity ``block``/``module``/``tensor``: per-tensor weights in mergekit's conditional syntax, a list of
``{filter, value}`` with a final default ``{value}``. mergekit takes, for each tensor, the first entry whose
``filter`` is a substring of the tensor's name, so the filters are ordered and made exact: a block's filter is its
prefix with the trailing dot (``model.layers.1.`` never matches ``model.layers.10.``), a module type's is
``.<module>.``, the embeddings group's are the substrings hf-glue groups by (``embed``, ``wte``, ``wpe``,
``patch``), and the head group is the default. Given the saved model's tensor names, every name is checked to get
its own group's weight; a name that would not gets its own exact filter first.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

from ..engine.matrix import group_of

logger = logging.getLogger(__name__)

CONFIG_FILE = "mergekit_config.yml"
#: hf-glue's --combine → mergekit's merge_method
COMBINE_METHODS = {"task-arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear",
                   "dare-ties": "dare_ties"}
#: the substrings `group_of` puts a tensor outside the numbered blocks into the "embeddings" group by
EMBEDDING_TAGS = ("embed", "wte", "wpe", "patch")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_NUMBERED = re.compile(r"\.\d+$")
_PEFT_PREFIX = "base_model.model."
_LORA_FACTOR = re.compile(r"\.lora_(?:A|B)(?:\.weight)?$|\.lora_embedding_(?:A|B)$")


class _Dumper(yaml.SafeDumper):
    """Block style, numbers lists inline (as mergekit writes its configs), keys in insertion order."""


def _represent_list(dumper, data):
    flow = bool(data) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def first_match(filters: Sequence[Optional[str]], name: str) -> int:
    """The index of the entry mergekit applies to tensor ``name`` (``evaluate_setting``: the first filter that is
    ``None``, ``"*"`` or a substring of the name), -1 if none."""
    for i, f in enumerate(filters):
        if f is None or f == "*" or f in name:
            return i
    return -1


def weight_filters(groups: Sequence[str], granularity: str,
                   names: Optional[Iterable[str]] = None) -> list[tuple[Optional[str], str]]:
    """Ordered ``(filter, group)`` entries, the last one the default (filter ``None``), such that mergekit gives each
    tensor its `group_of` group's weight. With ``names`` (the saved model's tensors) this is checked for every name
    whose group is one of ``groups`` and fixed with exact-name filters where needed."""
    groups = list(groups)
    if granularity == "model" or len(groups) == 1:
        return [(None, groups[0])]
    if granularity == "tensor":
        entries = [(g, g) for g in sorted(groups, key=len, reverse=True)]  # a longer name before its substrings
    else:
        numbered = [g for g in groups if g not in ("embeddings", "head")]
        if granularity == "block":
            entries = [(f"{g}.", g) for g in numbered if _NUMBERED.search(g)]
            entries += [(f"{g}.", g) for g in numbered if not _NUMBERED.search(g)]  # (none from group_of)
        else:  # module: the name inside the block, shared by every block
            entries = [(f".{g}.", g) for g in numbered]
        entries.sort(key=lambda e: len(e[0]), reverse=True)
        if "embeddings" in groups:
            entries += [(tag, "embeddings") for tag in EMBEDDING_TAGS]
    default = "head" if "head" in groups else entries[-1][1]
    entries.append((None, default))
    if names is None or granularity == "tensor":  # tensor: exact names, longest first, are right by construction
        return entries
    expected = {n: group_of(n, granularity) for n in names}
    expected = {n: g for n, g in expected.items() if g in groups}
    embedded = [n for n, g in expected.items() if g == "embeddings"]
    entries = [(f, g) for f, g in entries if g != "embeddings" or f is None or any(f in n for n in embedded)]
    exact: dict[str, str] = {}
    for _ in range(len(expected) + 1):
        ordered = sorted(exact.items(), key=lambda e: len(e[0]), reverse=True) + entries
        filters = [f for f, _ in ordered]
        wrong = {n: g for n, g in expected.items() if ordered[first_match(filters, n)][1] != g}
        if not wrong:
            return ordered
        exact.update(wrong)
    raise AssertionError("unreachable: exact names, longest first, always match their own filter")


def _model_ref(entry: dict, lora: Optional[dict] = None):
    """mergekit's ModelReference for an expert entry of merge_result.json (``id``, ``revision``): a string
    ``path[@revision][+adapter[@revision]]``, or the structured form when a name holds ``@`` or ``+``."""
    parts = [entry] + ([lora] if lora else [])
    if any(ch in str(p["id"]) + str(p.get("revision") or "") for p in parts for ch in "@+"):
        def path(p):
            return {"path": str(p["id"]), **({"revision": p["revision"]} if p.get("revision") else {})}
        return {"model": path(entry), **({"lora": path(lora)} if lora else {})}
    return "+".join(f"{p['id']}@{p['revision']}" if p.get("revision") else str(p["id"]) for p in parts)


def saved_tensors(folder: Path) -> dict[str, str]:
    """Name → dtype (``float32``, ...) of the floating tensors of the model saved in ``folder``, from the
    safetensors headers (no tensor is read). An adapter's tensors are given under the base model's names."""
    out: dict[str, str] = {}
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("adapter_model.safetensors"))
    for file in files:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name == "__metadata__" or info.get("dtype") not in _SAFETENSORS_DTYPES:
                continue
            if file.name.startswith("adapter_model"):
                name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
                if _LORA_FACTOR.search(name):
                    name = _LORA_FACTOR.sub(".weight", name)
                out.setdefault(name, "")  # an adapter's dtype is not the base's
                continue
            out[name] = _SAFETENSORS_DTYPES[info["dtype"]]
    return out


def _dtype(result: dict, tensors: Optional[dict[str, str]]) -> Optional[str]:
    found = {d for d in (tensors or {}).values() if d}
    if found:
        return found.pop() if len(found) == 1 else "float32"
    chosen = ((result.get("config") or {}).get("experts") or {}).get("dtype")
    return chosen if chosen in _SAFETENSORS_DTYPES.values() else None


def _weights(result: dict, names: list[str], filters: list[tuple[Optional[str], str]], k: int):
    """Expert ``k``'s ``weight`` setting: its α (model granularity) or the conditional list over ``filters``."""
    if result.get("granularity", "model") == "model" or not result.get("group_coefficients"):
        return float(result["coefficients"][names[k]])
    rows = result["group_coefficients"]
    return [({"filter": f} if f is not None else {}) | {"value": float(rows[g][names[k]])} for f, g in filters]


def mergekit_config(result: dict, tensors: Optional[dict[str, str]] = None) -> str:
    """The YAML text of ``mergekit_config.yml`` for a merge result (the content of ``merge_result.json``);
    ``tensors`` (name → dtype of the saved model, `saved_tensors`) checks the per-tensor filters and sets
    ``dtype``."""
    experts = result["experts"]
    names = [e.get("name") or e["id"] for e in experts]
    granularity = result.get("granularity", "model")
    groups = list(result.get("group_coefficients") or {"model": None})
    filters = weight_filters(groups, granularity, list(tensors) if tensors else None)
    glue = (result.get("config") or {}).get("glue") or {}
    combine = glue.get("combine")
    base = result.get("base_model")
    lora = bool(base) and not combine
    notes: list[str] = []  # "Note: ..." (still exact) or "Not exact: ..." (what differs)
    models = []
    if lora:
        notes.append("Note: mergekit folds each adapter into the base first: run mergekit-yaml with "
                     "--lora-merge-cache DIR")
        for k, e in enumerate(experts):
            models.append({"model": _model_ref(base, e), "parameters": {"weight": _weights(result, names, filters, k)}})
        rows = result.get("group_coefficients") or {"model": result["coefficients"]}
        rest = {g: 1.0 - sum(float(row[n]) for n in names) for g, row in rows.items()}
        if any(abs(v) > 1e-12 for v in rest.values()):
            weight = (rest[groups[0]] if len(filters) == 1 else
                      [({"filter": f} if f is not None else {}) | {"value": rest[g]} for f, g in filters])
            models.append({"model": _model_ref(base), "parameters": {"weight": weight}})
            notes.append("Note: the base itself has weight 1 - Σα (α does not sum to 1), so that the base's "
                         "weights count once as in hf-glue's θ_base + Σ α_k ΔW_k")
        if result.get("save_as") == "adapter":
            notes.append("Note: this output is one LoRA adapter; this configuration writes the equivalent full "
                         "model (the base with the blend folded in)")
        config = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    elif combine:
        spec = (result.get("details") or {}).get("task_vectors") or {}
        density = spec.get("density", glue.get("density"))
        for k, e in enumerate(experts):
            parameters = {"weight": _weights(result, names, filters, k)}
            if combine != "task-arithmetic":
                parameters["density"] = float(density)
            models.append({"model": _model_ref(e), "parameters": parameters})
        config = {"merge_method": COMBINE_METHODS[combine], "base_model": _model_ref(base), "models": models,
                  "parameters": {"normalize": False, "lambda": 1.0}}
        if combine in ("dare", "dare-ties"):
            notes.append("Not exact: DARE drops elements at random: hf-glue draws each tensor's mask from a "
                         f"generator seeded by (seed {spec.get('seed')}, tensor name) and rescales by 1/density; "
                         "mergekit draws from the global RNG and rescales by |τ|₁/|kept τ|₁ (rescale: true). The "
                         "merge matches in distribution, not tensor by tensor")
        if combine in ("ties", "dare-ties") and not _proportional(result, names, spec.get("election_weights")):
            notes.append("Not exact: hf-glue elected the TIES signs with the weights "
                         f"{[round(w, 6) for w in spec.get('election_weights') or []]} (the search's start); "
                         "mergekit elects with the weights below, so elements where the two elections differ "
                         "differ")
    else:
        for k, e in enumerate(experts):
            models.append({"model": _model_ref(e), "parameters": {"weight": _weights(result, names, filters, k)}})
        config = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    dtype = _dtype(result, tensors)
    if dtype:
        config["dtype"] = dtype
    if result.get("eval_after"):
        notes.append("Note: the saved model was fine-tuned after merging; this configuration writes θ(α), the merge "
                     "before fine-tuning")
    header = ["# This hf-glue merge as a mergekit merge: `mergekit-yaml mergekit_config.yml OUTPUT_DIR`.",
              f"# method {result.get('method')}, granularity {granularity}: each weight is the merge's coefficient "
              f"({'λ' if combine else 'α'}), used as is (normalize: false)."]
    if len(filters) > 1:
        header.append("# Per-tensor weights: mergekit applies the first entry whose filter is a substring of the "
                      "tensor's name; the last entry is the default.")
    if any(not e.get("revision") for e in experts + ([base] if base else [])):
        header.append("# Local models are referenced by the path hf-glue was given (a relative one is relative to "
                      "where it ran).")
    header += [f"# {note}." for note in notes]
    body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    return "\n".join(_wrap(line) for line in header) + "\n" + body


def _proportional(result: dict, names: list[str], election: Optional[Sequence[float]]) -> bool:
    """Whether every group's λ is a positive multiple of the election weights (then mergekit elects the same
    signs, as the sign of a sum does not change under a positive scale)."""
    if not election or len(election) != len(names):
        return False
    rows = result.get("group_coefficients") or {"model": result["coefficients"]}
    for row in rows.values():
        lam = [float(row[n]) for n in names]
        j = max(range(len(names)), key=lambda i: abs(election[i]))
        if election[j] == 0:
            return False
        scale = lam[j] / election[j]
        if scale <= 0 or any(abs(l - scale * w) > 1e-9 * max(1.0, abs(l)) for l, w in zip(lam, election)):
            return False
    return True


def _wrap(line: str, width: int = 116) -> str:
    """A comment line wrapped at ``width`` (continuation lines are comments too)."""
    words, out, current = line[2:].split(" "), [], "#"
    for word in words:
        if len(current) + 1 + len(word) > width and current != "#":
            out.append(current)
            current = "#"
        current += " " + word
    out.append(current)
    return "\n".join(out)


def write_mergekit_config(folder: Path, result: dict) -> Optional[str]:
    """Write ``folder/mergekit_config.yml`` for the result and return its text; ``None`` (with a logged note) when
    the result cannot be expressed (it names no experts or coefficients)."""
    try:
        text = mergekit_config(result, saved_tensors(folder))
    except (KeyError, TypeError, ValueError) as err:
        logger.warning("note: no %s written: the result cannot be expressed as a mergekit merge (%s).",
                       CONFIG_FILE, err)
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        return None
    (folder / CONFIG_FILE).write_text(text)
    return text
