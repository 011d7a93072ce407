"""Several processes (torchrun on CPU, gloo) and the memory estimate (issue: many processes, hardware floor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TEST_ENV, run_cli
from hf_glue.engine.memory import estimate, parse_size


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, **TEST_ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "hf_glue", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_learn_the_same_coefficients_as_one(cls_experts, tmp_path):
    common = ["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--steps", "25", "--seed", "4",
              "--batch-size", "32"]
    one = run_cli(*common, "--output-dir", str(tmp_path / "one"))
    two = torchrun(*common, "--output-dir", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "merge_result.json").read_text())
    b = json.loads((tmp_path / "two" / "merge_result.json").read_text())
    assert a["coefficients"].keys() == b["coefficients"].keys()
    for name in a["coefficients"]:
        assert b["coefficients"][name] == pytest.approx(a["coefficients"][name], abs=1e-4)
    for x, y in zip(a["history"], b["history"]):  # the same batches, so the same losses, step by step
        assert y["loss_plus"] == pytest.approx(x["loss_plus"], abs=1e-4)
    assert b["eval"]["accuracy"] == pytest.approx(a["eval"]["accuracy"], abs=0.02)
    # one summary, from the main process only
    assert two.stdout.count("Learned coefficients") == 1


def test_perturbation_parallel_mode(cls_experts, tmp_path):
    out = tmp_path / "pp"
    proc = torchrun("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--steps", "20",
                    "--parallel", "perturbation", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "merge_result.json").read_text())
    assert sum(result["coefficients"].values()) == pytest.approx(1.0)
    assert len(result["history"]) == 20
    assert max(result["coefficients"], key=result["coefficients"].get) == "org/expert-0"
    assert not list(tmp_path.glob(".*partial*"))


def test_memory_estimate_refuses_before_loading(cls_experts, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir", str(out),
                   "--max-memory", "1MB")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = next(l for l in proc.stderr.splitlines() if "error:" in l)
    assert "needs about" in line and "--dtype bfloat16" in line and "--max-memory" in line
    assert "SPSA" not in proc.stderr and "Tokenizing" not in proc.stderr  # before anything was loaded
    assert not out.exists()


def test_memory_estimate_scales_with_experts_and_dtype():
    config = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 30522,
              "architectures": ["BertForSequenceClassification"]}
    f32 = {torch.float32: 110_000_000}
    two = estimate(f32, 2, config, models_per_step=2, batch_per_process=32, sequence_length=128)
    eight = estimate(f32, 8, config, models_per_step=2, batch_per_process=32, sequence_length=128)
    half = estimate({torch.bfloat16: 110_000_000}, 8, config, models_per_step=2, batch_per_process=32,
                    sequence_length=128)
    assert eight.experts == 4 * two.experts == 4 * 2 * 110_000_000 * 4
    assert half.experts * 2 == eight.experts
    backward = estimate(f32, 2, config, models_per_step=1, batch_per_process=32, sequence_length=128, backward=True)
    assert backward.activations > two.activations
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5GB") == 1_500_000_000
