"""`MergeResult`: what a merge produced (α, costs, metrics, the blended model) and how it is saved."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..io.experts import PROCESSOR_FILES
from ..io.output import RESULT_FILE, atomic_dir, check_finite, final_name, strict_json

logger = logging.getLogger(__name__)

#: Configs that may name code shipped in the experts' repos (``auto_map``).
CODE_REFERENCING_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")

#: Tokenizer/processor files copied verbatim from the first expert into the output.
COPIED_FILES = PROCESSOR_FILES + ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


@dataclass
class MergeResult:
    """The outcome of a merge; ``model`` is a ready `PreTrainedModel` (hand it to `transformers.Trainer`)."""

    method: str
    task: str
    granularity: str
    experts: list[dict]
    dataset: dict
    coefficients: dict[str, float]
    alpha: torch.Tensor
    group_coefficients: Optional[dict[str, dict[str, float]]] = None
    method_info: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    eval_before: Optional[dict[str, float]] = None
    eval_after: Optional[dict[str, float]] = None
    #: held-out metrics during fine-tuning ({"step", metrics...}), when the Trainer evaluated at steps
    finetune_curve: list[dict] = field(default_factory=list)
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0
    peak_memory_bytes: Optional[int] = None
    command: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    model_name: Optional[str] = None
    #: LoRA experts: the base they are deltas over (name, id, revision) and the saved form (merged / adapter)
    base: Optional[dict] = None
    save_as: Optional[str] = None
    model: Any = field(default=None, repr=False)
    processor: Any = field(default=None, repr=False)
    source_dir: Optional[Path] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The content of ``merge_result.json`` (no model, no tokens)."""
        out = {
            "method": self.method,
            "method_info": self.method_info,
            "task": self.task,
            "granularity": self.granularity,
            "experts": self.experts,
            "dataset": self.dataset,
            "coefficients": self.coefficients,
        }
        if self.base is not None:
            out["base_model"] = self.base
            out["save_as"] = self.save_as or "merged"
        if self.granularity != "model":
            out["group_coefficients"] = self.group_coefficients
        out.update({
            "history": self.history,
            "eval": self.eval,
            "forward_passes": self.forward_passes,
            "backward_passes": self.backward_passes,
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "command": self.command,
            "versions": self.versions,
            "config": self.config,
        })
        if self.eval_before is not None:
            out["eval_before"] = self.eval_before
        if self.eval_after is not None:
            out["eval_after"] = self.eval_after
        if self.finetune_curve:
            out["finetune_curve"] = self.finetune_curve
        if self.details:
            out["details"] = self.details
        if self.model_name:
            out["model_name"] = self.model_name
        return out

    def save_pretrained(self, output_dir: str | Path, overwrite: bool = False) -> Path:
        """Write model (safetensors), tokenizer/processor, ``merge_result.json`` and the card, atomically."""
        if " merge " in f"{self.command} " and "--output-dir" not in self.command.split():
            self.command += f" --output-dir {shlex.quote(str(output_dir))}"  # the recorded command must run as is
        with atomic_dir(output_dir, overwrite) as tmp:
            self.write_into(tmp)
        return Path(output_dir)

    def write_into(self, folder: Path) -> None:
        """Write everything into an existing folder (no atomicity: `save_pretrained` wraps this); refuses weights
        holding NaN or inf."""
        if self.model is not None:
            what, advice = (("the fine-tuned model's", "fine-tuning diverged; try a lower --learning-rate.")
                            if self.eval_after is not None else
                            ("the merged model's", "check the coefficients and the experts' weights."))
            check_finite(self.model.state_dict().items(), what, advice)
            save_model(self.model, folder)
        if self.source_dir is not None:
            copy_processor_files(self.source_dir, folder)
        elif self.processor is not None:
            self.processor.save_pretrained(folder)
        settle_remote_code(folder, self.source_dir, bool((self.config.get("experts") or {}).get("trust_remote_code")))
        data = self.to_dict()
        (folder / RESULT_FILE).write_text(strict_json(data))
        write_card(folder, data)

    def push_to_hub(self, repo_id: str, output_dir: str | Path, **push_options) -> str:
        """Save into ``output_dir`` (card named after ``repo_id``) and push it; returns the commit or PR URL."""
        from ..io.hub import push_folder

        self.model_name = repo_id
        self.save_pretrained(output_dir, overwrite=True)
        return push_folder(Path(output_dir), repo_id, **push_options)


def copy_processor_files(source: Path, folder: Path, extra: tuple[str, ...] = ()) -> None:
    """Copy the tokenizer/processor files (and ``extra`` names) that exist in ``source`` into ``folder``."""
    for name in COPIED_FILES + extra:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def settle_remote_code(folder: Path, source: Optional[Path], trusted: bool) -> None:
    """Never let an output point at code it does not ship: with ``trusted`` (--trust-remote-code) the experts'
    ``*.py`` files are copied beside the configs whose ``auto_map`` names them; otherwise ``auto_map`` is dropped
    (the output loads with the standard transformers class), with a note."""
    dropped = []
    for name in CODE_REFERENCING_FILES:
        path = folder / name
        config = json.loads(path.read_text()) if path.is_file() else None
        if not isinstance(config, dict) or "auto_map" not in config:
            continue
        if trusted and source is not None:
            for code in source.glob("*.py"):
                shutil.copy2(code, folder / code.name)
            continue
        del config["auto_map"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        dropped.append(name)
    if dropped:
        logger.warning("note: dropped auto_map from %s: it names the experts' own code, which the output does not "
                       "ship without --trust-remote-code.", ", ".join(dropped))


def save_model(model, folder: Path) -> None:
    """``model.save_pretrained`` in safetensors; a PEFT adapter without PEFT's check of the base's vocabulary (it
    looks the base up by id, warns "Could not find a config file" for a cache-only or local base, and a blend never
    resizes the vocabulary)."""
    from peft import PeftModel

    extra = {"save_embedding_layers": False} if isinstance(model, PeftModel) else {}
    model.save_pretrained(folder, safe_serialization=True, **extra)


def write_card(folder: Path, data: Optional[dict] = None) -> Path:
    """(Re)write ``README.md``, the trajectory PNG and ``mergekit_config.yml`` (the blend as a mergekit merge,
    checked against the saved model's tensor names) from the result (by default ``merge_result.json``) and
    ``compare.json`` if the folder has one."""
    from .card import generate_card
    from .mergekit import write_mergekit_config
    from .plots import plot_trajectories

    if data is None:
        data = json.loads((folder / RESULT_FILE).read_text())
    png = plot_trajectories(data, folder / "glue_trajectory.png")
    compare = folder / "compare.json"
    comparison = json.loads(compare.read_text()).get("card") if compare.is_file() else None
    mergekit_yaml = write_mergekit_config(folder, data)
    (folder / "README.md").write_text(generate_card(data, trajectory_png=png.name if png else None,
                                                    comparison=comparison, mergekit_yaml=mergekit_yaml,
                                                    folder_name=final_name(folder)))
    return folder / "README.md"

