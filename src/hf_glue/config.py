"""Dataclass configs shared by the CLI (`commands.dataclass_args`: `HfArgumentParser`'s rules), YAML files and the
Python API.

Each field's `metadata["help"]` is its `--help` text; `__post_init__` checks every field against its type hint
and `BOUNDS` (YAML values and API arguments bypass argparse's typing) and rejects bad values naming the flag.
"""

from __future__ import annotations

import math
import numbers
import types
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from .errors import GlueError

#: the merge methods hf-glue ships (methods/: the registry is the truth, a test keeps the two equal); named here so
#: that `--help` lists them without importing torch
BUILTIN_METHODS = ("glue", "uniform", "data-size", "proxy", "full-gradient", "cma", "nevergrad", "weights")

#: The longest search accepted: a million SPSA steps is two million forward passes, far past any useful run.
MAX_STEPS = 1_000_000
#: Seeds feed numpy and torch generators, which take unsigned 32-bit seeds.
MAX_SEED = 2**32 - 1
#: Every integer option must fit a C long (torch and numpy take them as int64).
MAX_INT = 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """The range of a numeric option: ``low <= value <= high`` (``low < value`` when ``open_low``)."""

    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {self.low} and {self.high}"
        if self.open_low:
            return "positive" if self.low == 0 else f"greater than {self.low}"
        return f"at least {self.low}"


_POSITIVE = Bound(0, open_low=True)
_NON_NEGATIVE = Bound(0)
_COUNT = Bound(1)
#: Ranges by field name (a name means the same in every config); for list fields, of each value.
BOUNDS: dict[str, Bound] = {
    "steps": Bound(1, MAX_STEPS),
    "batch_size": _COUNT,
    "eval_batch_size": _COUNT,
    "seed": Bound(0, MAX_SEED),
    "seeds": Bound(0, MAX_SEED),
    "data_sizes": _COUNT,
    "perturbation": _POSITIVE,
    "perturbation_decay": _NON_NEGATIVE,
    "gain": _POSITIVE,
    "first_step": _POSITIVE,
    "stability": _NON_NEGATIVE,  # A < 0 makes (t + 1 + A) negative: the gain sequence is not defined
    "spsa_samples": _COUNT,
    "threads": Bound(1, 4096),
    "screen_batches": Bound(0, MAX_STEPS),
    "probe_steps": Bound(1, MAX_STEPS),
    "probe_candidates": Bound(2),
    "probe_learning_rate": _POSITIVE,
    "average_last": Bound(0, 1),
    "proxy_batches": _COUNT,
    "adam_lr": _POSITIVE,
    "calibration_samples": _COUNT,
    "checkpoint_every": _NON_NEGATIVE,
    "max_length": _COUNT,
    "max_train_samples": _COUNT,
    "max_eval_samples": _COUNT,
    "finetune_epochs": _NON_NEGATIVE,
    "learning_rate": _POSITIVE,
    "per_device_train_batch_size": _COUNT,
    "num_processes": _COUNT,
}


def option_flag(name: str) -> str:
    """The command-line spelling of a config field: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_fields(config: Any) -> None:
    """Check every field of a dataclass config against its type hint and `BOUNDS`, naming the flag and the value;
    numbers given for float fields become floats, tuples become lists."""
    for name, hint in _field_hints(type(config)).items():
        setattr(config, name, check_value(option_flag(name), getattr(config, name), hint, BOUNDS.get(name)))


@cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)  # from the annotations (``Field.type`` is a string under postponed evaluation)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def check_value(flag: str, value: Any, hint: Any, bound: Optional[Bound] = None) -> Any:
    """``value`` checked against a type hint (bool, int, float, str, Literal, list and Optional of them; other
    hints and unions of several types pass unchecked) and ``bound``; a `GlueError` names ``flag``. Returns it
    normalised (floats, lists)."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        if (value is None and len(members) < len(get_args(hint))) or len(members) > 1:
            return value  # None where it is allowed; a union of several types is not checked here
        hint = members[0]
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        if not isinstance(value, str) or value not in choices:
            raise GlueError(f"{flag} must be one of {', '.join(choices)}; got {value!r}.")
        return value
    if get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise GlueError(f"{flag} takes a list of values (in YAML: [a, b]), got {value!r}.")
        return [_scalar(f"each {flag} value", v, get_args(hint)[0], bound) for v in value]
    return _scalar(flag, value, hint, bound)


def _scalar(what: str, value: Any, kind: type, bound: Optional[Bound]) -> Any:
    if kind not in (bool, str, int, float):
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise GlueError(f"{what} must be true or false, got {value!r}.")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise GlueError(f"{what} must be text, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise GlueError(f"{what} must be a whole number, got {value!r}.")
        value = int(value)
    else:  # float
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise GlueError(f"{what} must be a number, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise GlueError(f"{what} must be a number, got {value!r}.")
        value = float(value)
        if not math.isfinite(value):
            raise GlueError(f"{what} must be a finite number, got {value}.")
    if bound is not None and not bound.admits(value):
        raise GlueError(f"{what} must be {bound.describe()}, got {value}.")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise GlueError(f"{what} is out of range, got {value}.")
    return value


#: searching methods that cannot take --granularity auto (it is GLUE's two-phase search)
AUTO_REFUSED = ("cma", "nevergrad", "full-gradient")


@dataclass
class GlueConfig:
    """How the coefficients α are learned (the method and its optimiser)."""

    method: str = field(
        default="glue",
        metadata={"metavar": "{" + ",".join(BUILTIN_METHODS) + "}", "help": "How α is chosen: glue (SPSA, default), uniform, data-size, proxy, full-gradient, "
                  "cma (CMA-ES) or nevergrad (NGOpt) on GLUE's forward-pass budget, or weights (the coefficients "
                  "given with --weights)."},
    )
    steps: int = field(default=100, metadata={"help": "Optimisation steps (each SPSA step costs two forward passes)."})
    batch_size: int = field(
        default=32, metadata={"help": "Global batch size per step, split across processes when several run."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order and SPSA perturbations: same seed, same α."})
    parametrization: Optional[Literal["simplex", "softmax", "box"]] = field(
        default=None,
        metadata={"help": "simplex: SPSA on α with projection onto the simplex (used unless --combine); softmax: "
                  "SPSA on logits; box: each coefficient in --bounds, clipped (used with --combine)."},
    )
    granularity: Literal["model", "block", "module", "tensor", "auto"] = field(
        default="model",
        metadata={"help": "One α per expert (model, the paper's), per transformer block (block), per module type "
                  "(module: e.g. every layer's query together), or per tensor. auto (glue): half the steps at model "
                  "granularity, then the rest per block (per module for LoRA adapters) from the best α so far; the "
                  "answer, model-wide or per block, is the one with the lowest validation loss."},
    )
    combine: Optional[Literal["task-arithmetic", "ties", "dare", "dare-ties"]] = field(
        default=None,
        metadata={"help": "Merge full experts as task vectors θ_k − θ_base over --base-model, processed as "
                  "mergekit does (ties: trim to --density and elect signs; dare: drop with keep-probability "
                  "--density and rescale; dare-ties: both), then learn their coefficients in --bounds: "
                  "θ = θ_base + Σ λ_k τ̂_k."},
    )
    density: float = field(
        default=0.5, metadata={"help": "--combine ties/dare/dare-ties: fraction of each task vector kept."}
    )
    bounds: list[float] = field(
        default_factory=lambda: [0.0, 1.5],
        metadata={"help": "--parametrization box: the range LO HI of every coefficient (AdaMerging-style)."},
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
        metadata={"help": "Size of the first update when a is calibrated (0.1 simplex, 0.5 softmax when unset); for "
                          "cma and nevergrad, the initial step σ0 (0.3 simplex, 1.0 softmax when unset)."},
    )
    stability: Optional[float] = field(
        default=None, metadata={"help": "SPSA A in a_t = a / (t + 1 + A)^0.602 (default: a tenth of --steps)."}
    )
    spsa_samples: int = field(default=1, metadata={"help": "Perturbations averaged per step (q); 2q forward passes."})
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "glue, cma, nevergrad: the answer is the candidate with the lowest loss on validation "
                  "rows among the simple starts (uniform, data-size, each expert alone, even blends of pairs) and "
                  "the search's iterates, so it is never worse there than any simple start. This share of the "
                  "train rows is held apart from the search for it (at least 8 rows, at most half and 256; the "
                  "eval split is never used); 0 (default): the search uses every train row and the candidates are "
                  "scored on them too (at most 256). Which serves better is measured in docs/results.md."},
    )
    select: Literal["loss", "probe"] = field(
        default="loss",
        metadata={"help": "glue, cma, nevergrad: how the answer is chosen among the candidates. loss (default): the "
                  "lowest validation loss; probe: for a start to fine-tune, the --probe-candidates with the lowest "
                  "validation loss are each trained --probe-steps AdamW steps (at --probe-learning-rate) and the "
                  "lowest validation loss after them wins (needs --validation-fraction > 0; one process, experts "
                  "held whole: no --shard, --offload or --blend on-the-fly)."},
    )
    probe_steps: int = field(default=16, metadata={"help": "--select probe: training steps from each candidate."})
    probe_candidates: int = field(default=3, metadata={"help": "--select probe: how many of the best candidates."})
    probe_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "--select probe: AdamW learning rate (default: the fine-tuning --learning-rate)."}
    )
    screen_batches: int = field(
        default=2,
        metadata={"help": "glue: an on/off switch kept under its old name (it counted train batches before the "
                  "validation rows existed): any positive value starts SPSA from the simple start with the lowest "
                  "loss on the validation rows (scored once, for the answer's choice too); 0: start at --init. It "
                  "keeps the search out of a poor basin near --init."},
    )
    average_last: float = field(
        default=0.5,
        metadata={"help": "glue: the average α of this final fraction of the steps (Polyak–Ruppert averaging, no "
                  "extra forward passes) is one of the candidates the answer is chosen from (0: none)."},
    )
    proxy: Literal["loss", "accuracy", "logme"] = field(
        default="loss",
        metadata={"help": "proxy method: score each expert alone on target train data by loss, accuracy or LogME."},
    )
    proxy_batches: int = field(default=8, metadata={"help": "proxy method: train batches each expert is scored on."})
    adam_lr: float = field(
        default=0.05, metadata={"help": "full-gradient method: Adam learning rate on α (simplex) or its logits."}
    )
    calibration_samples: int = field(
        default=4, metadata={"help": "Probe perturbations used once to calibrate a when --gain is unset."}
    )
    parallel: Literal["data", "perturbation"] = field(
        default="data",
        metadata={"help": "Several processes: shard each batch (data) or draw one Δ per process (perturbation)."},
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size for held-out evaluation."})
    checkpoint_every: int = field(
        default=10,
        metadata={"help": "Save the search state beside --output-dir every this many steps (0: only when "
                  "interrupted), so a killed run can continue with --resume."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the interrupted search saved beside --output-dir (same options); it ends at the "
                  "same α as an uninterrupted run."},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.init == "data-size" and not self.data_sizes:
            raise GlueError("--init data-size needs --data-sizes n1 n2 ... (one per expert).")
        if len(self.bounds) != 2 or not self.bounds[0] < self.bounds[1]:
            raise GlueError(f"--bounds takes LO HI with LO < HI; got {self.bounds}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise GlueError(f"--validation-fraction must be in [0, 1); got {self.validation_fraction}.")
        if not 0.0 < self.density <= 1.0:
            raise GlueError(f"--density must be in (0, 1]; got {self.density}.")
        if self.granularity == "auto" and self.method in AUTO_REFUSED:
            raise GlueError(f"--granularity auto is GLUE's coarse-to-fine search; method {self.method} needs a fixed "
                            "granularity: pass --granularity model or block.")
        if self.parametrization == "box" and not self.combine:
            raise GlueError("--parametrization box is for task vectors (--combine ... with --base-model): without "
                            "them, coefficients outside the simplex would scale the experts' weights themselves.")

    def engine_granularity(self, adapters: bool = False) -> str:
        """The granularity the blending engine is built at: auto's finer level is block (module for adapters)."""
        if self.granularity != "auto":
            return self.granularity
        return "module" if adapters else "block"

    @property
    def space(self) -> str:
        """The coefficient space searched: --parametrization, else box for --combine and simplex otherwise."""
        return self.parametrization or ("box" if self.combine else "simplex")

    @property
    def c(self) -> float:
        return self.perturbation or (0.1 if self.space == "softmax" else 0.05)

    @property
    def first_move(self) -> float:
        return self.first_step or (0.5 if self.space == "softmax" else 0.1)

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
    base_model: Optional[str] = field(
        default=None,
        metadata={"help": "The base model the experts are deltas over (repo id, repo@revision or folder). For LoRA "
                  "adapters it defaults to the base their adapter_config.json names."},
    )
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})
    threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads per process (on CPU runs). Default: 1 for experts under 2M parameters, else "
                  "the cores divided among the processes on this machine; OMP_NUM_THREADS, when set, is kept."},
    )
    max_memory: Optional[str] = field(
        default=None,
        metadata={"help": "Memory budget per device, e.g. 20GiB (default: what the device has free); a run "
                  "estimated to need more is refused before any weights are loaded."},
    )
    blend: Literal["auto", "materialized", "on-the-fly"] = field(
        default="auto",
        metadata={"help": "How the search forms each blended model: materialized (whole, 2q per step: fastest), "
                  "on-the-fly (each block from the K experts just before it runs: the experts and one block), or "
                  "auto: the fastest that fits the memory estimate (see `hf-glue estimate`)."},
    )
    shard: Optional[bool] = field(
        default=None,
        metadata={"help": "Shard the experts and the model across processes with FSDP2: each process holds 1/P of "
                  "every expert and blends its own shard. Default: chosen when several processes run and one "
                  "device cannot hold the replicated run; --shard false never shards.",
                  "nargs": "?", "const": True},
    )
    offload: Literal["none", "cpu", "disk"] = field(
        default="none",
        metadata={"help": "Blend on the fly (implied) with the experts kept in CPU memory (cpu) or in their "
                  "safetensors files (disk), one tensor's rows copied to the device at a time: the last resort when "
                  "K experts do not fit on it."},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if any(not e.strip() for e in self.experts):
            raise GlueError(f"--experts has an empty name ({self.experts}); give repo ids or folders.")
        if self.max_memory is not None:
            check_size("--max-memory", self.max_memory)
        if self.offload != "none" and self.blend == "materialized":
            raise GlueError(f"--offload {self.offload} streams experts layer by layer, which --blend materialized "
                            "does not: use --blend on-the-fly (or auto).")
        if self.shard and (self.blend == "on-the-fly" or self.offload != "none"):
            raise GlueError("--shard and on-the-fly blending (--blend on-the-fly / --offload) are two ways to fit a "
                            "large model; pick one.")
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
                  "token-classification, seq2seq, causal-lm, image-classification, audio-classification, ctc."},
    )
    text_column: Optional[str] = field(
        default=None, metadata={"help": "Text column (default: detected); for token-classification the words (a list "
                                "per row), for seq2seq the source text."}
    )
    text_pair_column: Optional[str] = field(
        default=None, metadata={"help": "Second text column for sentence-pair classification."}
    )
    label_column: Optional[str] = field(
        default=None, metadata={"help": "Label column (default: detected); for token-classification the tags (a list "
                                "per row: ints or the experts' tag names)."}
    )
    target_column: Optional[str] = field(
        default=None, metadata={"help": "Target text column for seq2seq (default: detected: target, summary, "
                                "output, ...)."}
    )
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (default: detected)."})
    audio_column: Optional[str] = field(
        default=None, metadata={"help": "Audio column: a datasets Audio column or float arrays (default: detected)."}
    )
    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "Truncate tokenised text to this many tokens (default: 128, or the experts' number of "
                  "positions when that is smaller)."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many train rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many eval rows."})

    def __post_init__(self) -> None:
        check_fields(self)


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
    finetune_mode: Literal["adapter", "full"] = field(
        default="adapter",
        metadata={"help": "For LoRA experts: adapter (train the blended adapter only: cheap; default) or full "
                  "(fold it into the base and train every weight)."},
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class OutputConfig:
    """Where the merged model goes: a local folder, and optionally a Hub repo."""

    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder for the merged model, card and result."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace --output-dir if it holds a previous hf-glue output (only)."}
    )
    push_to_hub: Optional[str] = field(
        default=None,
        metadata={"help": "Also push the output to this Hub repo (org/name); the token comes from HF_TOKEN or "
                  "`hf auth login`."},
    )
    save_as: Literal["merged", "adapter"] = field(
        default="merged",
        metadata={"help": "For LoRA experts: merged (the base with the learned blend folded in, a plain "
                  "transformers model; default) or adapter (one PEFT LoRA adapter equal to the blend, loaded with "
                  "PeftModel.from_pretrained(base, OUTPUT_DIR))."},
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrackingConfig:
    """Experiment trackers: the search's loss, gains and α per step, then the fine-tuning Trainer's logs."""

    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Trackers to log to: tensorboard, trackio, wandb, mlflow (one or more), or none. Each is "
                  "an optional extra (pip install 'hf-glue[tensorboard]'), imported only when named here."},
    )
    logging_dir: str = field(
        default="runs",
        metadata={"help": "Where local trackers write (tensorboard: LOGGING_DIR/RUN_NAME/{search,finetune}; view "
                  "with `tensorboard --logdir runs`). Kept apart from --output-dir, which is written whole at the "
                  "end."},
    )
    run_name: Optional[str] = field(
        default=None, metadata={"help": "The run's name in the trackers (default: the output folder's name and the "
                                        "start time)."}
    )
    tracker_project: str = field(
        default="hf-glue", metadata={"help": "Project (wandb, trackio) or experiment (mlflow) the run is logged in."}
    )

    def __post_init__(self) -> None:
        check_fields(self)
        from .tracking import check_report_to

        self.report_to = check_report_to(self.report_to)


@dataclass
class PushConfig:
    """How an output folder is pushed (shared by `merge --push-to-hub` and `hf-glue push`)."""

    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    revision: Optional[str] = field(default=None, metadata={"help": "Push to this branch (created if missing)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    commit_message: Optional[str] = field(default=None, metadata={"help": "Commit message of the push."})

    def __post_init__(self) -> None:
        check_fields(self)


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

    def __post_init__(self) -> None:
        check_fields(self)
        check_size("--max-shard-size", self.max_shard_size)


def _glue_default(name: str):
    return GlueConfig.__dataclass_fields__[name].default


@dataclass
class EstimateConfig:
    """What `hf-glue estimate` plans for: the launch, and the search's batches and blended models per step."""

    num_processes: int = field(
        default=1, metadata={"help": "Processes the merge will run on (torchrun --nproc_per_node N, accelerate "
                             "launch --num_processes N; all nodes together)."})
    device: Literal["auto", "cuda", "cpu"] = field(
        default="auto", metadata={"help": "The device kind to plan for (auto: a GPU if this machine has one); with "
                                  "--max-memory you can plan for a machine you are not on."})
    method: str = field(default=_glue_default("method"), metadata={"metavar": "{" + ",".join(BUILTIN_METHODS) + "}",
                                                                   "help": "The merge method (see `merge --help`)."})
    batch_size: int = field(default=_glue_default("batch_size"), metadata={"help": "Global batch size per step."})
    eval_batch_size: int = field(default=_glue_default("eval_batch_size"),
                                 metadata={"help": "Batch size for held-out evaluation."})
    max_length: Optional[int] = field(
        default=None, metadata={"help": "Tokens per row (default: 128, or the experts' number of positions)."})
    spsa_samples: int = field(default=_glue_default("spsa_samples"),
                              metadata={"help": "Perturbations per SPSA step (q): 2q blended models per step."})
    parallel: Literal["data", "perturbation"] = field(
        default=_glue_default("parallel"), metadata={"help": "How processes share a step (see `merge --help`)."})
    combine: Optional[Literal["task-arithmetic", "ties", "dare", "dare-ties"]] = field(
        default=None, metadata={"help": "Task vectors over --base-model: one more row (the base) is held."})
    json: bool = field(default=False, metadata={"help": "Print the estimate as JSON."})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_size % self.num_processes or self.eval_batch_size % self.num_processes:
            raise GlueError(f"--batch-size {self.batch_size} and --eval-batch-size {self.eval_batch_size} must be "
                            f"divisible by --num-processes {self.num_processes}.")


@dataclass
class CompareConfig:
    """What `hf-glue compare` runs and where it writes its table and chart."""

    methods: list[str] = field(
        default_factory=lambda: ["glue", "uniform", "data-size", "proxy", "full-gradient"],
        metadata={"help": "Methods to compare (data-size is skipped when no --data-sizes are given)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds: each method runs once per seed."})
    include_experts: bool = field(
        default=True, metadata={"help": "Score every expert alone too (--no-include-experts: only the methods)."}
    )
    baselines: list[str] = field(
        default_factory=list,
        metadata={"help": "Other checkpoints of the experts' architecture to score (and fine-tune) as starts beside "
                          "the blends, e.g. the pretrained base with its task head; not blended."},
    )
    output_dir: str = field(default="compare", metadata={"help": "Folder for compare.json and compare.png."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace --output-dir if it holds a previous compare output (only)."}
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.methods:
            raise GlueError("compare needs at least one method in --methods.")
        if not self.seeds:
            raise GlueError("compare needs at least one seed in --seeds.")


def check_size(flag: str, text: str) -> int:
    """Bytes of a size option such as ``20GiB``; a one-line error naming ``flag`` when it cannot be read."""
    from .engine.memory import parse_size

    try:
        size = parse_size(text)
    except (GlueError, ValueError):
        size = 0
    if size <= 0:
        raise GlueError(f"{flag} {text!r} is not a size: use a positive number with a unit, e.g. 20GiB or 500MB.")
    return size


def yaml_problem(err: Exception) -> str:
    """A YAML parse error in one line: what went wrong and where (line, column)."""
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_mapping_file(path: Path, what: str, holds: str) -> dict:
    """The mapping of option → value in a YAML file (JSON for ``.json``), or one `GlueError` line saying what is
    wrong with the file: missing, a folder, not UTF-8 text, unreadable, malformed, not a mapping (``holds``)."""
    import json

    import yaml

    if not path.is_file():
        raise GlueError(f"{what} {'is a folder' if path.is_dir() else 'does not exist'}.")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise GlueError(f"{what} is not a UTF-8 text file.") from None
    except OSError as err:
        raise GlueError(f"{what} cannot be read: {err.strerror or err}.") from None
    except json.JSONDecodeError as err:
        raise GlueError(f"{what} is not valid JSON: {err}.") from None
    except yaml.YAMLError as err:
        raise GlueError(f"{what} is not valid YAML: {yaml_problem(err)}.") from None
    values = {} if values is None else values
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise GlueError(f"{what} must hold a mapping of {holds}.")
    return values


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


def hub_environment() -> str:
    """``VAR=value `` prefixes for the Hub settings this process resolved repo ids with, when not the defaults:
    ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1`` and ``HF_ENDPOINT`` (without any user:password part). Prepended to a
    recorded command so that it reproduces the run; never a token or any other variable."""
    import os
    import shlex
    from urllib.parse import urlsplit, urlunsplit

    from huggingface_hub import constants

    env = []
    default_cache = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
    if os.path.abspath(constants.HF_HUB_CACHE) != os.path.abspath(default_cache):
        env.append(("HF_HUB_CACHE", constants.HF_HUB_CACHE))
    if constants.HF_HUB_OFFLINE:
        env.append(("HF_HUB_OFFLINE", "1"))
    endpoint = constants.ENDPOINT.rstrip("/")
    if endpoint != "https://huggingface.co":
        parts = urlsplit(endpoint)  # drop credentials embedded as https://user:secret@host
        env.append(("HF_ENDPOINT", urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))))
    return "".join(f"{name}={shlex.quote(value)} " for name, value in env)
