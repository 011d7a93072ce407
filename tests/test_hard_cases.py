"""The hard cases of scripts/hard_cases.py with the default options, two seeds each (the script runs ten)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import HUB_CACHE

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("hard_cases", REPO / "scripts" / "hard_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hard_cases"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hard_cases = _script()


@pytest.fixture(scope="module")
def hard_root(build_root) -> Path:
    root = build_root / "hard"
    hard_cases.publish_experts(root, HUB_CACHE)
    return root


@pytest.mark.parametrize("name", list(hard_cases.CASES))
def test_defaults_find_the_right_blend(name, hard_root):
    report = hard_cases.run_case(hard_cases.CASES[name], [0, 1], HUB_CACHE, hard_root, {}, grid_step=5)
    judge = report["judges"][hard_cases.JUDGE]
    for run in report["runs"]:
        assert run["found"][hard_cases.JUDGE], (name, run, judge["best_alpha"], judge["loss_bar"])
        # the documented cost: 2 per step, 2 per calibration probe (4), then the candidates' scoring
        assert run["forward_passes"] == 2 * 100 + 2 * 4 + run["selection"]["forward_passes"]
        assert run["selection"]["forward_passes"] > 0


def test_the_grid_covers_the_simplex():
    points = hard_cases.simplex_grid(3, 4)
    assert len(points) == 15 and all(abs(sum(p) - 1) < 1e-12 for p in points)
    assert (1.0, 0.0, 0.0) in points and (0.25, 0.25, 0.5) in points
