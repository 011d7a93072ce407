"""Smoke tests of the real-data experiments (scripts/experiments/run.py --quick): packaged data → experts fine-tuned
from the real base → local hub cache → `hf-glue compare` → the results table, for every setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_ENV

RUN = Path(__file__).resolve().parents[1] / "scripts" / "experiments" / "run.py"


@pytest.mark.parametrize("setup", ["text", "images", "label-skew", "speech", "hospitals", "speech-mix", "lm", "lm-lora"])
def test_quick_experiment_runs_end_to_end(setup, tmp_path):
    env = {**os.environ, **TEST_ENV}
    env.pop("HF_HUB_CACHE")  # run.py points the hub cache at its own work folder
    proc = subprocess.run([sys.executable, str(RUN), setup, "--quick", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "report" / f"{setup}.json").read_text())["small"]
    # LoRA setups score the adapters alone, not the bare base (compare takes no full model beside adapters)
    expected = {"best single expert", "uniform", "GLUE (model)"} | (set() if setup == "lm-lora" else {"base model"})
    assert expected <= set(summary), sorted(summary)
    glue = summary["GLUE (model)"]
    assert glue["forward_passes"] > 0 and len(glue["merged"]) == len(glue["finetuned"]) == 1
    if setup.startswith("lm"):  # perplexity
        assert all(v >= 1.0 for v in glue["merged"] + glue["finetuned"])
    else:  # accuracy
        assert all(0.0 <= v <= 1.0 for v in glue["merged"] + glue["finetuned"])
    assert abs(sum(glue["coefficients"][0].values()) - 1.0) < 1e-6
    table = (tmp_path / "report" / f"{setup}.md").read_text()
    assert "| GLUE (model) |" in table and f"run.py {setup} --quick" in table


def test_report_only_regenerates_the_tables_from_kept_results(tmp_path):
    """The compare.json files kept with --results-dir (as docs/results/<setup>/ commits them) are all --report-only
    needs: the tables it writes equal the run's."""
    env = {**os.environ, **TEST_ENV}
    env.pop("HF_HUB_CACHE")
    kept = tmp_path / "results"
    run = [sys.executable, str(RUN), "label-skew", "--quick", "--workdir", str(tmp_path / "work"), "--results-dir",
           str(kept)]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("compare.json")) == \
        ["small/seed0/model/compare.json"]
    table = (kept / "label-skew.md").read_text()
    (tmp_path / "work" / "runs").rename(tmp_path / "gone")  # nothing but the kept files
    again = subprocess.run([*run, "--report-only"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (kept / "label-skew.md").read_text() == table and "| GLUE (model) |" in table


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _committed_tables() -> list[str]:
    """docs/results/<setup>/<setup>.md and the task-vector tables <setup>/<setup>-combine*.md beside them."""
    return sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.glob("*/*.md")
                  if p.stem == p.parent.name or p.stem.startswith(p.parent.name + "-combine"))


@pytest.mark.parametrize("table", _committed_tables())
def test_committed_results_regenerate_their_tables(table, tmp_path):
    """docs/results/<setup>/ holds the raw compare.json of every run behind its tables: --report-only rebuilds each
    committed table from them, to the character."""
    import shutil

    setup = table.split("/")[0]
    kept = tmp_path / setup
    shutil.copytree(RESULTS / setup, kept)
    env = {**os.environ, **TEST_ENV}
    env.pop("HF_HUB_CACHE")
    text = (RESULTS / table).read_text()
    command = text.split("Command: `python scripts/experiments/run.py ", 1)[1].split("`", 1)[0].split()
    (kept / table.split("/")[1]).unlink()  # written again, or the test fails
    proc = subprocess.run([sys.executable, str(RUN), *command, "--report-only", "--results-dir", str(kept),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (kept / table.split("/")[1]).read_text() == text
