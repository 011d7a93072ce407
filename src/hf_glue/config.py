"""Dataclass configs shared by the CLI (via `HfArgumentParser`), YAML files and the Python API.

Each field's `metadata["help"]` is its `--help` text; `__post_init__` rejects bad values by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

from .errors import GlueError

PARAMETRIZATIONS = ("simplex", "softmax")
GRANULARITIES = ("model", "block", "tensor")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class GlueConfig:
    """How the coefficients α are learned (the method and its optimiser)."""

    method: str = field(
        default="glue",
        metadata={"help": "How α is chosen: glue (SPSA, default), uniform, data-size, proxy, full-gradient."},
    )
    steps: int = field(default=100, metadata={"help": "Optimisation steps (each SPSA step costs two forward passes)."})
    batch_size: int = field(
        default=32, metadata={"help": "Global batch size per step, split across processes when several run."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order and SPSA perturbations: same seed, same α."})
    parametrization: Literal["simplex", "softmax"] = field(
        default="simplex",
        metadata={"help": "simplex: SPSA on α with projection onto the simplex (default); softmax: SPSA on logits."},
    )
    granularity: Literal["model", "block", "tensor"] = field(
        default="model",
        metadata={"help": "One α per expert (model, the paper's), per transformer block (block), or per tensor."},
    )
    init: Literal["uniform", "data-size"] = field(
        default="uniform", metadata={"help": "Starting point: uniform α, or α ∝ --data-sizes."}
    )
    data_sizes: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Training-set size of each expert, in --experts order (for data-size init/method)."},
    )
    weights: Optional[list[float]] = field(
        default=None, metadata={"help": "Coefficients, one per expert, for --method weights (and hf-glue blend)."}
    )
    perturbation: Optional[float] = field(
        default=None, metadata={"help": "SPSA perturbation size c (default 0.05 simplex, 0.1 softmax)."}
    )
    perturbation_decay: float = field(default=0.101, metadata={"help": "SPSA γ: c_t = c / (t + 1)^γ."})
    gain: Optional[float] = field(
        default=None,
        metadata={"help": "SPSA gain a; default: calibrated so the first update moves α by --first-step."},
    )
    first_step: Optional[float] = field(
        default=None,
        metadata={"help": "Size of the first update when a is calibrated (default 0.1 simplex, 0.5 softmax)."},
    )
    stability: Optional[float] = field(
        default=None, metadata={"help": "SPSA A in a_t = a / (t + 1 + A)^0.602 (default: a tenth of --steps)."}
    )
    spsa_samples: int = field(default=1, metadata={"help": "Perturbations averaged per step (q); 2q forward passes."})
    proxy: Literal["loss", "accuracy", "logme"] = field(
        default="loss",
        metadata={"help": "proxy method: score each expert alone on target train data by loss, accuracy or LogME."},
    )
    proxy_batches: int = field(default=8, metadata={"help": "proxy method: train batches each expert is scored on."})
    adam_lr: float = field(
        default=0.05, metadata={"help": "full-gradient method: Adam learning rate on α (simplex) or its logits."}
    )
    calibration_samples: int = field(
        default=4, metadata={"help": "Probe perturbations used once to calibrate a when --learning-rate is unset."}
    )
    parallel: Literal["data", "perturbation"] = field(
        default="data",
        metadata={"help": "Several processes: shard each batch (data) or draw one Δ per process (perturbation)."},
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size for held-out evaluation."})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise GlueError(f"steps must be at least 1, got {self.steps}.")
        if self.batch_size < 1:
            raise GlueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.parametrization not in PARAMETRIZATIONS:
            raise GlueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}.")
        if self.granularity not in GRANULARITIES:
            raise GlueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")
        if self.spsa_samples < 1:
            raise GlueError(f"spsa_samples must be at least 1, got {self.spsa_samples}.")
        if self.perturbation is not None and self.perturbation <= 0:
            raise GlueError(f"perturbation must be positive, got {self.perturbation}.")
        if self.init == "data-size" and not self.data_sizes:
            raise GlueError("init='data-size' needs --data-sizes n1 n2 ... (one per expert).")
        if self.proxy not in ("loss", "accuracy", "logme"):
            raise GlueError(f"proxy must be one of loss, accuracy, logme; got {self.proxy!r}.")
        if self.data_sizes is not None and any(n <= 0 for n in self.data_sizes):
            raise GlueError(f"data_sizes must all be positive, got {self.data_sizes}.")

    @property
    def c(self) -> float:
        return self.perturbation or (0.05 if self.parametrization == "simplex" else 0.1)

    @property
    def first_move(self) -> float:
        return self.first_step or (0.1 if self.parametrization == "simplex" else 0.5)

    @property
    def A(self) -> float:
        return self.stability if self.stability is not None else 0.1 * self.steps


@dataclass
class ExpertsConfig:
    """Which experts to merge and how to load them."""

    experts: list[str] = field(
        default_factory=list,
        metadata={"help": "Expert checkpoints: Hub repo ids (org/name or org/name@revision) or local folders."},
    )
    allow_pickle: bool = field(
        default=False, metadata={"help": "Allow pickled .bin weights when an expert has no safetensors (unsafe)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code shipped in the expert repos (off unless you trust them)."}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Dtype experts are held and blended in (auto: as stored); blending accumulates in float32."},
    )
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})
    max_memory: Optional[str] = field(
        default=None,
        metadata={"help": "Memory budget per device, e.g. 20GiB (default: what the device has free); a run "
                  "estimated to need more is refused before any weights are loaded."},
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise GlueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        duplicates = sorted({e for e in self.experts if self.experts.count(e) > 1})
        if duplicates:
            raise GlueError(f"expert {duplicates[0]!r} is listed more than once in --experts; list each once.")


@dataclass
class DataConfig:
    """The target dataset α is learned on, and how its columns map to model inputs."""

    dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Target dataset: Hub repo id (org/name[@revision]), a local folder, or a data file."},
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration (subset) name."})
    train_split: str = field(default="train", metadata={"help": "Split α is learned on."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out split (default: validation or test if present, else a tenth of the train split)."},
    )
    task: Optional[str] = field(
        default=None,
        metadata={"help": "Task family (default: from the experts' architecture): sequence-classification, "
                  "causal-lm, image-classification."},
    )
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column (default: detected)."})
    text_pair_column: Optional[str] = field(
        default=None, metadata={"help": "Second text column for sentence-pair classification."}
    )
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (default: detected)."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (default: detected)."})
    max_length: int = field(default=128, metadata={"help": "Truncate tokenised text to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many train rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many eval rows."})


@dataclass
class FinetuneConfig:
    """Optional fine-tuning of the merged model with `transformers.Trainer` on the target train split."""

    finetune_epochs: float = field(
        default=0.0, metadata={"help": "Fine-tune the merged model for this many epochs (0: no fine-tuning)."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Fine-tuning learning rate (Trainer)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Fine-tuning batch size per device."})
    training_args: Optional[str] = field(
        default=None,
        metadata={"help": "JSON or YAML file with any other transformers.TrainingArguments fields."},
    )

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0:
            raise GlueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}.")


@dataclass
class OutputConfig:
    """Where the merged model goes: a local folder, and optionally a Hub repo."""

    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for the merged model, card and result."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace --output-dir if it exists."})
    push_to_hub: Optional[str] = field(
        default=None,
        metadata={"help": "Also push the output to this Hub repo (org/name); the token comes from HF_TOKEN or "
                  "`hf auth login`."},
    )


@dataclass
class PushConfig:
    """How an output folder is pushed (shared by `merge --push-to-hub` and `hf-glue push`)."""

    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    revision: Optional[str] = field(default=None, metadata={"help": "Push to this branch (created if missing)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    commit_message: Optional[str] = field(default=None, metadata={"help": "Commit message of the push."})


@dataclass
class BlendConfig:
    """`hf-glue blend`: apply known coefficients to the experts' files, streaming, without target data."""

    weights: Optional[list[float]] = field(
        default=None, metadata={"help": "One coefficient per expert, non-negative, summing to 1."}
    )
    from_result: Optional[str] = field(
        default=None,
        metadata={"help": "merge_result.json of an earlier merge: its experts (pinned revisions) and coefficients "
                  "(per group too)."},
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest output safetensors shard."})


@dataclass
class CompareConfig:
    """What `hf-glue compare` runs and where it writes its table and chart."""

    methods: list[str] = field(
        default_factory=lambda: ["glue", "uniform", "data-size", "proxy", "full-gradient"],
        metadata={"help": "Methods to compare (data-size is skipped when no --data-sizes are given)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds: each method runs once per seed."})
    include_experts: bool = field(default=True, metadata={"help": "Also score every expert alone."})
    output_dir: str = field(default="compare", metadata={"help": "Folder for compare.json and compare.png."})

    def __post_init__(self) -> None:
        if not self.methods:
            raise GlueError("compare needs at least one method in --methods.")
        if not self.seeds:
            raise GlueError("compare needs at least one seed in --seeds.")


def torch_dtype(name: Optional[str]):
    """The torch dtype for a --dtype value; None for ``auto`` (keep each tensor's stored dtype)."""
    if not name or name == "auto":
        return None
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def non_default_items(config: object) -> dict:
    """The fields of a dataclass config that differ from their defaults (for the reproduction command)."""
    defaults = type(config)()  # type: ignore[call-arg]
    return {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) != getattr(defaults, f.name)}


def to_dict(config: object) -> dict:
    return asdict(config)  # type: ignore[arg-type]


def _cli_args(config: object) -> list[str]:
    """Flags reproducing a config's non-default fields."""
    import shlex

    args = []
    for name, value in non_default_items(config).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else [flag, "false"]
        elif isinstance(value, (list, tuple)):
            args += [flag] + [shlex.quote(str(v)) for v in value]
        elif value is not None:
            args += [flag, shlex.quote(str(value))]
    return args


def merge_command(*configs: object, command: str = "merge") -> str:
    """The `hf-glue` command line that reproduces a run from its configs (never includes a token)."""
    parts = ["hf-glue", command]
    for config in configs:
        if config is not None:
            parts += _cli_args(config)
    return " ".join(parts)
