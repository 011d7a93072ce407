"""Experiment trackers through accelerate's tracking API: the search's loss, gains and α per step.

The accelerator is built with ``log_with`` (see `pipeline.make_accelerator`); `SearchTracker` turns the methods'
history entries into scalars and logs them on the main process. Fine-tuning passes the same trackers to the
Trainer (`finetune.tracking_arguments`). Tracker packages are optional and imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import GlueError

#: --report-to name → the module it needs (checked before any work) and the extra that installs it.
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(names: Sequence[str]) -> list[str]:
    """The trackers asked for, validated: known names, ``none`` alone, packages installed (else which extra)."""
    names = list(dict.fromkeys(n.strip().lower() for n in names))
    if "none" in names:
        if len(names) > 1:
            raise GlueError(f"--report-to {' '.join(names)}: 'none' cannot be combined with trackers.")
        return names
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise GlueError(f"--report-to {unknown[0]!r} is not a tracker hf-glue logs to; choose from "
                        f"{', '.join(TRACKERS)} or none.")
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise GlueError(f"--report-to {missing[0]}: the {TRACKERS[missing[0]]!r} package is not installed; install "
                        f"it with pip install 'hf-glue[{missing[0]}]' (in a clone: pip install -e '.[{missing[0]}]'), "
                        "or pass --report-to none.")
    return names


def check_logging_dir(config, output_dir: str) -> None:
    """Refuse local tracker logs inside the output folder: it is written whole at the end, and must hold only what
    hf-glue writes there."""
    if "tensorboard" not in config.report_to:
        return
    logs, out = Path(config.logging_dir).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if logs == out or out in logs.parents:
        raise GlueError(f"--logging-dir {config.logging_dir!r} lies inside --output-dir {output_dir!r}, which is "
                        "written whole when the merge is done: give the logs a folder of their own (default: runs).")


def active(names: Sequence[str]) -> list[str]:
    """The trackers to start (``none`` means no tracker)."""
    return [n for n in names if n != "none"]


def default_run_name(output_dir: Optional[str]) -> str:
    """The output folder's name and the start time, e.g. ``merged-20261127-101500``."""
    stem = Path(output_dir).name if output_dir else "hf-glue"
    return f"{stem or 'hf-glue'}-{time.strftime('%Y%m%d-%H%M%S')}"


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as the flat scalars trackers accept (lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class SearchTracker:
    """Logs one run's search to the accelerator's trackers: a scalar per quantity, the step as x-axis."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def start(self, config: dict) -> None:
        """Start the trackers the accelerator was built with and record the run's settings."""
        self.accelerator.init_trackers("hf-glue", config=flat_config(config))

    def log_step(self, entry: dict) -> None:
        """One history entry of a method (GLUE: L±, gain a_t, perturbation c_t; others: loss) and its α."""
        values = {f"search/{key}": float(entry[key]) for key in ("loss", "loss_plus", "loss_minus", "gain",
                                                                 "perturbation") if key in entry}
        if "loss" not in entry and "loss_plus" in entry:
            values["search/loss"] = (float(entry["loss_plus"]) + float(entry["loss_minus"])) / 2
        for name, value in (entry.get("coefficients") or {}).items():
            values[f"alpha/{name}"] = float(value)
        self.accelerator.log(values, step=int(entry["step"]))

    def log_eval(self, metrics: dict, step: int) -> None:
        """The blend's held-out metrics, at the search's last step."""
        self.accelerator.log({f"eval/{k}": float(v) for k, v in metrics.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)

    def finish(self) -> None:
        self.accelerator.end_training()


@dataclass
class TrackingRun:
    """One run in the trackers (--report-to), named alike in each: the search logs to it through accelerate's
    trackers, then the fine-tuning Trainer. TensorBoard writes ``logging_dir/run_name/{search,finetune}``; wandb and
    trackio log run ``run_name`` in ``project``; mlflow in experiment ``project`` (its store from
    MLFLOW_TRACKING_URI, as usual)."""

    names: list[str]
    run_name: str
    project: str
    logging_dir: str

    @classmethod
    def from_config(cls, config, output_dir: Optional[str]) -> Optional["TrackingRun"]:
        """The run a `TrackingConfig` asks for (None: --report-to none)."""
        names = active(config.report_to)
        if not names:
            return None
        return cls(names, config.run_name or default_run_name(output_dir), config.tracker_project, config.logging_dir)

    @property
    def tensorboard_dir(self) -> Optional[Path]:
        return Path(self.logging_dir) / self.run_name if "tensorboard" in self.names else None

    def search_trackers(self) -> list:
        """accelerate `GeneralTracker`s for the search (the accelerator's ``log_with``)."""
        from accelerate import tracking

        made = {
            "tensorboard": lambda: tracking.TensorBoardTracker("search", self.tensorboard_dir),
            "wandb": lambda: tracking.WandBTracker(self.project, name=self.run_name),
            "trackio": lambda: tracking.TrackioTracker(self.project, name=self.run_name),
            "mlflow": lambda: tracking.MLflowTracker(experiment_name=self.project, run_name=self.run_name),
        }
        return [made[name]() for name in self.names]

    def trainer_setup(self) -> tuple[dict, list]:
        """`TrainingArguments` fields and callbacks that send the Trainer's logs to the trackers."""
        from accelerate import PartialState

        callbacks = []
        if self.tensorboard_dir is not None and PartialState().is_main_process:  # else: the Trainer's temporary dir
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            callbacks.append(TensorBoardCallback(SummaryWriter(str(self.tensorboard_dir / "finetune"))))
        others = [n for n in self.names if n != "tensorboard"]
        return {"report_to": others or "none", "run_name": self.run_name, "project": self.project}, callbacks

    def summary(self) -> dict:
        """Where to find the run's logs (``details.tracking`` in merge_result.json; the printed summary)."""
        return {"report_to": self.names, "run_name": self.run_name, "project": self.project,
                **({"tensorboard": str(self.tensorboard_dir)} if self.tensorboard_dir is not None else {})}
