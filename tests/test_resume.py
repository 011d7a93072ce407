"""Resume after a crash or an interruption: kill -9, then SIGINT, then --resume ends at the uninterrupted α."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_ENV
from hf_glue import GlueConfig, merge_experts
from hf_glue.commands import main
from hf_glue.io.checkpoint import STATE_FILE, state_dir_for

STEPS = 150


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hf_glue", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **TEST_ENV})


def _wait_for_state(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> int:
    """Poll the saved state until it records ``at_least`` steps; returns the step it holds."""
    state = state_dir_for(out) / STATE_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {at_least}: "
                                 f"{proc.stderr.read()[-2000:]}")
        if state.is_file():
            step = json.loads(state.read_text())["spsa"]["t"]  # replaced atomically: always whole
            if step >= at_least:
                return step
        time.sleep(0.01)
    raise AssertionError(f"no saved state with {at_least} steps after {timeout} s")


def test_kill_then_interrupt_then_resume_reaches_the_uninterrupted_alpha(cls_experts, tmp_path):
    reference = merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=STEPS, seed=0),
                              output_dir=str(tmp_path / "reference"))
    out = tmp_path / "out"
    args = ["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--steps", str(STEPS),
            "--seed", "0", "--checkpoint-every", "5", "--output-dir", str(out)]

    # 1. kill -9 mid-search: nothing but the saved state is left
    proc = _start(*args)
    _wait_for_state(out, proc, at_least=10)
    proc.kill()
    proc.wait()
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))

    # 2. resume, then Ctrl-C: one line that says how to resume; the state is saved at the step it stopped
    proc = _start(*args, "--resume")
    _wait_for_state(out, proc, at_least=40)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    line = next(l for l in stderr.splitlines() if "interrupted by SIGINT" in l)
    assert "--resume" in line and str(out) in line
    stopped_at = json.loads((state_dir_for(out) / STATE_FILE).read_text())["spsa"]["t"]
    assert f"after step {stopped_at} of {STEPS}" in line and stopped_at < STEPS
    assert not out.exists()

    # 3. other settings cannot resume this state
    code = main([*args[:-2], "--output-dir", str(out), "--resume", "--seed", "1"])
    assert code == 1 and (state_dir_for(out) / STATE_FILE).is_file()

    # 4. resume to the end: the same α, step for step, as the run that was never stopped
    proc = _start(*args, "--resume")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    result = json.loads((out / "merge_result.json").read_text())
    assert result["coefficients"] == pytest.approx(reference.coefficients, abs=1e-12)
    assert [h["loss_plus"] for h in result["history"]] == pytest.approx(
        [h["loss_plus"] for h in reference.history], abs=1e-12)
    assert not state_dir_for(out).exists()  # nothing left to resume
    # the result describes the whole search: its cost, and a command that reproduces it (no --resume)
    assert result["forward_passes"] == reference.forward_passes
    assert result["details"]["resumed_at_step"] == stopped_at
    assert "--resume" not in result["command"] and "--resume" not in (out / "README.md").read_text()


def test_resume_without_a_saved_state_fails_before_loading(cls_experts, tmp_path, capsys):
    code = main(["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target",
                 "--output-dir", str(tmp_path / "out"), "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and "no saved search state" in err and "Tokenizing" not in err
    code = main(["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--method", "uniform",
                 "--output-dir", str(tmp_path / "out"), "--resume"])
    assert code == 1 and "--method uniform" in capsys.readouterr().err


def test_state_with_a_rejected_step_saves_and_loads(tmp_path):
    """A rejected step's non-finite losses are stored as null (strict JSON), so checkpoints keep working."""
    from hf_glue.io.checkpoint import Checkpoint

    ckpt = Checkpoint(tmp_path / "state", {"glue": {"steps": 3}}, every=1)
    ckpt.save({"spsa": {"t": 2}, "history": [{"step": 1, "loss_plus": float("nan"), "loss_minus": float("inf"),
                                               "rejected": True}], "details": {}, "batches": 6})
    state = ckpt.load()
    assert state["history"][0]["loss_plus"] is None and state["batches"] == 6
    other = Checkpoint(tmp_path / "state", {"glue": {"steps": 4}}, every=1)
    with pytest.raises(Exception, match="glue"):
        other.load()
