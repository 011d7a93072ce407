"""Expert checkpoints: resolve their metadata, refuse incompatible ones early, then read weights lazily.

Order matters for users: configs, tokenizers and parameter shapes are checked from small metadata files
before any weight file is downloaded; weights are then streamed tensor by tensor from safetensors.
"""

from __future__ import annotations

import math
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from . import hub
from ..errors import GlueError
from .safetensors import SafetensorsError, SafetensorsReader, read_header

#: Small files fetched first: configs, weight indexes, tokenizer and processor files.
METADATA_PATTERNS = ("*.json", "*.txt", "*.model", "README.md")
SAFETENSORS_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json")
#: Files that define tokenisation / preprocessing: they must be identical across experts.
PROCESSOR_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",  # transformers 5 saves a processor's feature extractor (sampling rate, ...) here
)

@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, read from file headers without loading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Expert:
    """One resolved expert: its pinned snapshot, parsed ``config.json`` and (after fetch) its tensor index."""

    repo: hub.ResolvedRepo
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    #: set for architectures whose checkpoint keys differ from the module's: reads weights via from_pretrained
    loader: Optional[Callable[[], dict[str, torch.Tensor]]] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The key used for this expert in coefficients: the spec the user gave (unique per run)."""
        return self.repo.spec

    def processor_hashes(self) -> dict[str, str]:
        return {
            f: hashlib.sha256((self.repo.path / f).read_bytes()).hexdigest()
            for f in PROCESSOR_FILES
            if (self.repo.path / f).is_file()
        }

    def iter_tensors(self, names: Optional[set[str]] = None, rows: Optional[dict[str, tuple[int, int]]] = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, one weight file open at a time; refuses NaN/inf weights (they
        would poison the blend at any coefficient, as 0·NaN is NaN). ``rows``: read only rows ``[start, stop)``
        (dim 0) of the tensors it names (a process's shard)."""
        for key, tensor in self._read_tensors(names, rows or {}):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise GlueError(f"expert {self.name!r}: tensor {key!r} holds NaN or inf values; refusing to merge "
                                "it (check or re-export that checkpoint).")
            yield key, tensor

    def _read_tensors(self, names: Optional[set[str]], rows: dict[str, tuple[int, int]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
        def cut(key: str, t: torch.Tensor) -> torch.Tensor:  # pickled / read-through checkpoints: whole, then cut
            return t[rows[key][0]: rows[key][1]] if key in rows and t.dim() else t

        if self.loader is not None:
            state = self.loader()
            for key in self.tensors:
                if names is None or key in names:
                    yield key, cut(key, state[key])
            return
        by_file: dict[Path, list[str]] = {}
        for info in self.tensors.values():
            if names is None or info.name in names:
                by_file.setdefault(info.file, []).append(info.name)
        for file, keys in by_file.items():
            if file.suffix == ".safetensors":
                with SafetensorsReader(file) as reader:
                    for key in keys:
                        yield key, reader.read(key, rows.get(key))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key in keys:
                    yield key, cut(key, state[key])
                del state


def resolve_experts(specs: Sequence[str], what: str = "expert", minimum: int = 2) -> list[Expert]:
    """Pin every expert and fetch only its metadata files; fails fast on missing repos or configs.

    ``what``: the word errors use (``baseline`` for compare's --baselines); ``minimum``: how many must be given."""
    return [expert_from_repo(repo, what) for repo in resolve_repos(specs, what, minimum)]


def resolve_repos(specs: Sequence[str], what: str = "expert", minimum: int = 2) -> list[hub.ResolvedRepo]:
    """Pin every input (full checkpoint or adapter) to a snapshot of its metadata files; refuses duplicates."""
    if len(specs) < minimum:
        raise GlueError(f"GLUE merges at least two experts; got {len(specs)} ({list(specs)}). Pass --experts A B ...")
    repos: list[hub.ResolvedRepo] = []
    for spec in specs:
        repo = hub.resolve(spec, allow_patterns=METADATA_PATTERNS, what=what)
        same = next((r for r in repos if r.path.resolve() == repo.path.resolve()), None)
        if same is not None:  # e0 and ./e0, a folder and a link to it, org/a and org/a@<its commit>
            raise GlueError(f"{what}s {same.spec!r} and {spec!r} are the same checkpoint ({repo.path}); list it once.")
        repos.append(repo)
    return repos


def expert_from_repo(repo: hub.ResolvedRepo, what: str = "expert") -> Expert:
    """A full checkpoint from its pinned snapshot: its ``config.json`` read and checked."""
    spec = repo.spec
    config_file = repo.path / "config.json"
    if not config_file.is_file():
        raise GlueError(f"{what} {spec!r} has no config.json in {repo.path}: is it a transformers model?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GlueError(f"{what} {spec!r}: config.json is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise GlueError(f"{what} {spec!r}: config.json holds a {type(config).__name__}, not a JSON object.")
    return Expert(repo=repo, config=config)


def expected_state_shapes(expert: Expert, model_class, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes the model class builds from this expert's config (on the meta device: no memory)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(expert.repo.path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise GlueError(
                f"expert {expert.name!r} needs custom model code; pass --trust-remote-code if you trust the repo."
            ) from None
        raise GlueError(f"expert {expert.name!r}: cannot build {model_class.__name__} from its config: {err}") from None
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def check_compatible(
    experts: Sequence[Expert], model_class, trust_remote_code: bool = False
) -> dict[str, tuple[int, ...]]:
    """Refuse experts that differ in architecture, parameter names/shapes or tokenizer files, naming the first.

    Returns the module's names and shapes (from the first expert's config), for callers to compare keys with.
    """
    check_model_types(experts)
    ref = experts[0]
    ref_shapes = expected_state_shapes(ref, model_class, trust_remote_code)
    for other in experts[1:]:
        _compare_shapes(ref.name, ref_shapes, other.name, expected_state_shapes(other, model_class, trust_remote_code),
                        where="from its config.json")
    check_processor_files(experts)
    return ref_shapes


def check_model_types(experts: Sequence[Expert]) -> None:
    """Refuse experts whose config.json declares another ``model_type`` than the first's."""
    ref = experts[0]
    ref_type = ref.config.get("model_type")
    for other in experts[1:]:
        if other.config.get("model_type") != ref_type:
            raise GlueError(
                f"expert {other.name!r} is a {other.config.get('model_type')!r} model but {ref.name!r} is "
                f"{ref_type!r}: all experts must share one architecture."
            )


def check_processor_files(experts: Sequence[Expert]) -> None:
    """Refuse experts whose tokenizer/processor files differ, naming the expert and the file."""
    ref = experts[0]
    ref_hashes = ref.processor_hashes()
    for other in experts[1:]:
        hashes = other.processor_hashes()
        for name in sorted(set(ref_hashes) | set(hashes)):
            if ref_hashes.get(name) != hashes.get(name):
                if name in ref_hashes and name in hashes:
                    what = f"its {name} differs from {ref.name!r}'s"
                else:
                    has, lacks = (ref.name, other.name) if name in ref_hashes else (other.name, ref.name)
                    what = f"{name} is present in {has!r} but not in {lacks!r}"
                raise GlueError(f"expert {other.name!r}: {what}; all experts must share one tokenizer/processor.")


def _compare_shapes(ref_name: str, ref: dict, name: str, shapes: dict, where: str) -> None:
    missing = [k for k in ref if k not in shapes]
    extra = [k for k in shapes if k not in ref]
    if missing or extra:
        key = (missing or extra)[0]
        side = f"lacks parameter {key!r} that {ref_name!r} has" if missing else f"has parameter {key!r} that {ref_name!r} lacks"
        raise GlueError(f"expert {name!r} {side} ({where}): all experts must share one architecture.")
    for key, shape in ref.items():
        if shapes[key] != shape:
            raise GlueError(
                f"expert {name!r}: parameter {key!r} has shape {list(shapes[key])} but {ref_name!r} has "
                f"{list(shape)} ({where}); all experts must share one architecture and size."
            )


def fetch_weights(experts: Sequence[Expert], allow_pickle: bool = False) -> None:
    """Download the weight files and index every tensor from file headers; checks names and shapes agree."""
    for expert in experts:
        path = hub.download(expert.repo, SAFETENSORS_PATTERNS)
        files = _weight_files(path, ".safetensors", "model.safetensors.index.json", "model.safetensors")
        if not files:
            if not allow_pickle:
                found = sorted(p.name for p in path.glob("*.bin"))
                raise GlueError(
                    f"expert {expert.name!r} has no *.safetensors weights"
                    + (f" (found {', '.join(found)})" if found else "")
                    + ": convert it to safetensors, or pass --allow-pickle to load pickled .bin files "
                    "(this runs pickle: only for repos you trust)."
                )
            path = hub.download(expert.repo, PICKLE_PATTERNS)
            files = _weight_files(path, ".bin", "pytorch_model.bin.index.json", "pytorch_model.bin")
            if not files:
                raise GlueError(f"expert {expert.name!r} has no weight files (*.safetensors or *.bin) in {path}.")
        expert.tensors = _index_files(files, expert.name)
    ref = experts[0]
    ref_shapes = {k: v.shape for k, v in ref.tensors.items()}
    for other in experts[1:]:
        _compare_shapes(ref.name, ref_shapes, other.name, {k: v.shape for k, v in other.tensors.items()},
                        where="in its weight files")


def index_without_weights(expert: Expert, model_class, trust_remote_code: bool = False) -> str:
    """Fill ``expert.tensors`` without downloading a weight: from the headers of safetensors files already on disk
    (a local folder, or a cached snapshot), else from the model built on the meta device from its config.json in
    the dtype the config names. Returns where they came from: ``"headers"`` or ``"config"``."""
    files = _weight_files(expert.repo.path, ".safetensors", "model.safetensors.index.json", "model.safetensors")
    if files and all(f.is_file() for f in files):
        expert.tensors = _index_files(files, expert.name)
        return "headers"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(expert.repo.path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = model_class.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    infos, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied weights: stored once
            seen.add(id(tensor))
            infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, expert.repo.path / "model.safetensors")
    expert.tensors = infos
    return "config"


def _weight_files(path: Path, suffix: str, index_name: str, single_name: str) -> list[Path]:
    index = path / index_name
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / single_name).is_file():
        return [path / single_name]
    return sorted(p for p in path.glob(f"*{suffix}") if p.is_file())


def _index_files(files: Sequence[Path], expert_name: str) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise GlueError(f"expert {expert_name!r}: weight file {file.name} listed in the index is missing.")
        if file.suffix == ".safetensors":
            try:
                header, _ = read_header(file)
            except (OSError, SafetensorsError) as err:
                raise GlueError(f"expert {expert_name!r}: cannot read {file.name}: {err}") from None
            for key, entry in header.items():
                tensors[key] = TensorInfo(key, entry.shape, entry.dtype, file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key, t in state.items():
                tensors[key] = TensorInfo(key, tuple(t.shape), t.dtype, file)
    return tensors


def read_through_transformers(experts: Sequence[Expert], model_class, trust_remote_code: bool = False) -> None:
    """Index and read experts in the module's key space via ``from_pretrained``, which applies transformers'
    checkpoint conversions (renames, fusions). They are linear, so blending after them is still Σ α_k θ_k."""
    from transformers import AutoConfig

    for expert in experts:
        float_dtypes = [i.dtype for i in expert.tensors.values() if i.dtype.is_floating_point]
        dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32
        config = AutoConfig.from_pretrained(expert.repo.path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            meta = model_class.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        infos, seen = {}, set()
        for name, tensor in meta.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # tied weights: one entry, functional_call ties the rest
                continue
            seen.add(id(tensor))
            infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, expert.repo.path)
        expert.tensors = infos

        def load(path=expert.repo.path, dtype=dtype) -> dict[str, torch.Tensor]:
            model = model_class.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
            return model.state_dict()

        expert.loader = load
