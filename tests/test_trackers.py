"""--report-to: the search logs loss, gains and α per step through accelerate's trackers; fine-tuning logs too."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import run_cli
from hf_glue import GlueError, TrackingConfig


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under ``folder``: tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def test_tensorboard_run_logs_alpha_gains_and_finetuning(cls_experts, tmp_path):
    out, logs = tmp_path / "merged", tmp_path / "tb"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir", str(out),
                   "--steps", "12", "--finetune-epochs", "1", "--report-to", "tensorboard", "--logging-dir",
                   str(logs), "--run-name", "demo", "--cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "merge_result.json").read_text())
    assert not list(out.rglob("events.out.tfevents.*")), "tracker logs are kept out of the output folder"
    assert result["details"]["tracking"] == {"report_to": ["tensorboard"], "run_name": "demo", "project": "hf-glue",
                                             "tensorboard": str(logs / "demo")}
    assert f"TensorBoard: {logs / 'demo'}" in proc.stdout  # the summary says where the logs are

    search = _scalars(logs / "demo" / "search")
    for name in cls_experts["ids"]:  # α per expert, every step, equal to the recorded history
        steps = sorted(search[f"alpha/{name}"])
        assert [s for s, _ in steps] == list(range(12))
        assert [v for _, v in steps] == pytest.approx([h["coefficients"][name] for h in result["history"]],
                                                      abs=1e-6)
    gains = sorted(search["search/gain"])
    assert [v for _, v in gains] == pytest.approx([h["gain"] for h in result["history"]], rel=1e-6)
    assert gains[0][1] > gains[-1][1] > 0  # Spall's decaying gain a_t
    assert len(search["search/loss_plus"]) == len(search["search/perturbation"]) == 12
    assert search["eval/accuracy"][0][1] == pytest.approx(result["eval"]["accuracy"], abs=1e-6)

    finetune = _scalars(logs / "demo" / "finetune")
    assert any(tag.startswith("train/") for tag in finetune), sorted(finetune)


def test_no_tracker_by_default(cls_experts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir",
                   str(tmp_path / "merged"), "--steps", "2", "--cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_report_to_is_checked_before_any_work(cls_experts, tmp_path):
    with pytest.raises(GlueError, match="'nope' is not a tracker"):
        TrackingConfig(report_to=["nope"])
    with pytest.raises(GlueError, match="'none' cannot be combined"):
        TrackingConfig(report_to=["none", "tensorboard"])
    assert TrackingConfig(report_to=["TensorBoard", "tensorboard"]).report_to == ["tensorboard"]
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: its absence cannot be shown")
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir",
                   str(tmp_path / "merged"), "--report-to", "wandb")
    assert proc.returncode != 0  # an optional extra that is missing is named, with the line that installs it
    assert "pip install 'hf-glue[wandb]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_logs_inside_the_output_folder_are_refused_before_any_work(cls_experts, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir", str(out),
                   "--report-to", "tensorboard", "--logging-dir", str(out / "runs"))
    assert proc.returncode != 0 and "lies inside --output-dir" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
