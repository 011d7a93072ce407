"""Several processes (torchrun on CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_ENV, run_cli


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, **TEST_ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "hf_glue", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def one_and_two_processes(common: list[str], tmp_path) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """Run ``hf-glue ARGS`` on 1 and on 2 processes; both must succeed with the same coefficients (to 1e-4).
    Returns both merge_result.json contents and the 2-process run."""
    one = run_cli(*common, "--output-dir", str(tmp_path / "one"))
    two = torchrun(*common, "--output-dir", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "merge_result.json").read_text())
    b = json.loads((tmp_path / "two" / "merge_result.json").read_text())
    assert a["coefficients"].keys() == b["coefficients"].keys()
    for name in a["coefficients"]:
        assert b["coefficients"][name] == pytest.approx(a["coefficients"][name], abs=1e-4)
    return a, b, two


def test_two_processes_learn_the_same_coefficients_as_one(cls_experts, tmp_path):
    # 10 held-out rows in batches of 4 over 2 processes: the last batch is uneven, and every row counts once
    common = ["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--steps", "25", "--seed", "4",
              "--batch-size", "32", "--max-eval-samples", "10", "--eval-batch-size", "4"]
    a, b, two = one_and_two_processes(common, tmp_path)
    for x, y in zip(a["history"], b["history"]):  # the same batches, so the same losses, step by step
        assert y["loss_plus"] == pytest.approx(x["loss_plus"], abs=1e-4)
    assert a["details"]["eval_samples"] == b["details"]["eval_samples"] == 10
    for metric in ("loss", "accuracy"):  # the same rows, each once: the same metrics
        assert b["eval"][metric] == pytest.approx(a["eval"][metric], abs=1e-5)
    # one summary, from the main process only
    assert two.stdout.count("Learned coefficients") == 1


def test_perturbation_parallel_equals_one_process_with_all_samples(cls_experts, tmp_path):
    """2 processes × 1 perturbation each (gathered) take the same steps as 1 process with --spsa-samples 2."""
    common = ["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--steps", "12", "--seed", "3"]
    out_pp, out_one = tmp_path / "pp", tmp_path / "one"
    proc = torchrun(*common, "--parallel", "perturbation", "--output-dir", str(out_pp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = run_cli(*common, "--spsa-samples", "2", "--output-dir", str(out_one))
    assert one.returncode == 0, one.stderr
    pp = json.loads((out_pp / "merge_result.json").read_text())
    ref = json.loads((out_one / "merge_result.json").read_text())
    assert pp["details"]["calibrated_gain"] == pytest.approx(ref["details"]["calibrated_gain"], rel=1e-5)
    for x, y in zip(ref["history"], pp["history"]):
        assert y["loss_plus"] == pytest.approx(x["loss_plus"], abs=1e-5)
        assert y["coefficients"] == pytest.approx(x["coefficients"], abs=1e-5)
    assert not list(tmp_path.glob(".*partial*"))


def test_logme_proxy_scores_every_process_rows(cls_experts, tmp_path):
    """LogME on 2 processes scores the gathered features of the whole batch, exactly like one process."""
    common = ["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--method", "proxy",
              "--proxy", "logme", "--proxy-batches", "2"]
    two = torchrun(*common, "--output-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    from hf_glue import GlueConfig, merge_experts

    one = merge_experts(cls_experts["ids"], "org/target", GlueConfig(method="proxy", proxy="logme", proxy_batches=2))
    scores = json.loads((tmp_path / "two" / "merge_result.json").read_text())["details"]["proxy_scores"]
    assert scores == pytest.approx(one.details["proxy_scores"], rel=1e-4)


def _alpha(result: dict) -> torch.Tensor:
    """α as learned: per group where there are groups, else per expert."""
    groups = result.get("group_coefficients") or {"model": result["coefficients"]}
    return torch.tensor([list(row.values()) for row in groups.values()], dtype=torch.float64)


def test_sharded_search_learns_the_one_process_coefficients(cls_experts, tmp_path):
    """--shard on 2 and on 3 processes (FSDP2 over gloo): each holds 1/P of every expert, blends its shards in
    place and runs the forwards sharded; α, the held-out metrics and the saved weights are the 1-process run's.
    Over 3 processes the shards are uneven (hidden 32 → 11, 11, 10 rows) and some empty (2 labels → 1, 1, 0), and
    so are the held-out batches (10 rows in batches of 6: the last one's 4 rows leave the third process without)."""
    common = ["merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--steps", "25", "--seed", "4",
              "--batch-size", "30", "--max-eval-samples", "10", "--eval-batch-size", "6", "--granularity", "block"]
    one = run_cli(*common, "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "merge_result.json").read_text())
    assert len(a["history"]) == 25 and _alpha(a).std() > 0.05  # a real search, not a corner
    x = load_file(tmp_path / "one" / "model.safetensors")
    for processes in (2, 3):
        out = tmp_path / f"sharded-{processes}"
        proc = torchrun(*common, "--shard", "--output-dir", str(out), nproc=processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        b = json.loads((out / "merge_result.json").read_text())
        assert len(b["history"]) == 25
        assert (_alpha(a) - _alpha(b)).abs().max() < 1e-6
        assert b["details"]["eval_samples"] == 10  # each row once, in lockstep
        for metric in ("loss", "accuracy"):
            assert b["eval"][metric] == pytest.approx(a["eval"][metric], abs=1e-5)
        held = b["details"]["memory"]
        assert held["strategy"] == "sharded" and held["processes"] == processes
        assert a["details"]["memory"]["strategy"] == "replicated"
        assert held["expert_bytes_per_process"] <= (0.6 if processes == 2 else 0.4) * \
            a["details"]["memory"]["expert_bytes_per_process"]
        y = load_file(out / "model.safetensors")
        assert x.keys() == y.keys()
        assert max(float((x[k].double() - y[k].double()).abs().max()) for k in x) < 1e-6


def test_sharded_perturbation_parallel_takes_the_replicated_steps(lm_experts, tmp_path):
    """Perturbation-parallel on a sharded model: all processes' perturbations are evaluated together, each on its
    share of the shared batch; the steps are those of the replicated perturbation-parallel run."""
    common = ["merge", "--experts", *lm_experts["ids"], "--dataset", "org/lm-target", "--steps", "8", "--seed", "1",
              "--parallel", "perturbation", "--batch-size", "8", "--screen-batches", "0"]
    runs = {}
    for name, flag in (("replicated", "false"), ("sharded", "true")):
        proc = torchrun(*common, "--shard", flag, "--output-dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "merge_result.json").read_text())
    assert runs["sharded"]["details"]["memory"]["strategy"] == "sharded"
    assert len(runs["replicated"]["history"]) == len(runs["sharded"]["history"]) == 8
    for x, y in zip(runs["replicated"]["history"], runs["sharded"]["history"]):
        assert y["loss_plus"] == pytest.approx(x["loss_plus"], abs=1e-5)
    assert (_alpha(runs["replicated"]) - _alpha(runs["sharded"])).abs().max() < 1e-6
