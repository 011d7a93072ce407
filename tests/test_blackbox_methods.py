"""CMA-ES (`--method cma`) and NGOpt (`--method nevergrad`): GLUE's objective, parametrisation and budget."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from conftest import run_cli
from hf_glue import GlueConfig, GlueError, merge_experts
from hf_glue.optim.blackbox import generation_sizes, glue_budget

METHODS = ["cma", "nevergrad"]


@pytest.fixture(scope="module")
def prep(cls_experts):
    """The three classifiers and the target (expert-0's domain), loaded once for the searches below."""
    from hf_glue.config import DataConfig, ExpertsConfig
    from hf_glue.pipeline import prepare

    return prepare(ExpertsConfig(experts=cls_experts["ids"]), DataConfig(dataset="org/target"), GlueConfig())


def _run(prep, config: GlueConfig):
    from hf_glue.pipeline import run_method

    return run_method(prep, config)


def test_generations_add_up_to_the_budget():
    for budget in range(3, 200):
        sizes = generation_sizes(budget, 7)
        assert sum(sizes) == budget and max(sizes) <= 7 and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-budget // 7) and min(sizes) >= 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("parametrization", ["simplex", "softmax"])
def test_finds_the_target_expert_on_glues_budget(prep, method, parametrization):
    config = GlueConfig(method=method, steps=10, parametrization=parametrization)
    out = _run(prep, config)
    coefficients = prep.matrix.summarize(out.alpha)
    assert max(coefficients, key=coefficients.get) == "org/expert-0", coefficients
    # 2 passes a step, 2 per calibration probe; scoring on the validation rows on top, as for GLUE
    budget = 2 * 10 + 2 * config.calibration_samples
    assert glue_budget(config) == budget and out.backward_passes == 0
    assert out.forward_passes == budget + out.details["selection"]["forward_passes"]
    assert len(out.history) == out.details["generations"] == len(generation_sizes(budget, out.details["population"]))
    assert [h["step"] for h in out.history] == list(range(len(out.history)))
    assert all(set(h) == {"step", "loss", "coefficients"} for h in out.history)
    # the answer is the candidate kept on the validation rows; the last recommendation is one of them
    record = out.details["selection"]
    kept = next(c for c in record["candidates"] if c["name"] == record["chosen"])
    assert kept["coefficients"] == pytest.approx(coefficients) and kept["loss"] == min(
        c["loss"] for c in record["candidates"])
    last = next(c for c in record["candidates"] if c["name"].startswith("search: final recommendation"))
    assert last["coefficients"] == pytest.approx(out.history[-1]["coefficients"])


@pytest.mark.parametrize("method", METHODS)
def test_block_granularity_stays_on_the_simplex(cls_experts, method):
    result = merge_experts(cls_experts["ids"], "org/target", GlueConfig(method=method, steps=3, granularity="block"))
    groups = len(result.group_coefficients)
    assert groups > 2 and result.alpha.shape == (groups, 3)
    assert (result.alpha >= 0).all()
    torch.testing.assert_close(result.alpha.sum(-1), torch.ones(groups, dtype=result.alpha.dtype))
    budget = glue_budget(GlueConfig(steps=3))
    assert result.forward_passes == budget + result.details["selection"]["forward_passes"]
    # generations of at most CMA-ES's default population for G·K coordinates
    assert result.details["population"] == generation_sizes(budget, 4 + int(3 * math.log(groups * 3)))[0]


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_alpha(prep, method):
    first, again, other = (_run(prep, GlueConfig(method=method, steps=3, seed=s)) for s in (0, 0, 1))
    assert torch.equal(first.alpha, again.alpha) and first.history == again.history
    assert first.history != other.history  # another seed searches elsewhere (both may keep the same start)


@pytest.mark.parametrize("method", METHODS)
def test_result_and_card_record_the_method(cls_experts, method, tmp_path):
    out = tmp_path / method
    merge_experts(cls_experts["ids"], "org/target", GlueConfig(method=method, steps=3), output_dir=str(out))
    result = json.loads((out / "merge_result.json").read_text())
    pretty = {"cma": "CMA-ES", "nevergrad": "NGOpt (nevergrad)"}[method]
    assert result["method"] == method and result["method_info"]["pretty_name"] == pretty
    assert result["method_info"]["reference"].startswith("https://arxiv.org/abs/")
    assert result["forward_passes"] == glue_budget(GlueConfig(steps=3)) + \
        result["details"]["selection"]["forward_passes"]
    chosen = result["details"]["selection"]["chosen"]
    assert f"Chosen: **`{chosen}`**" in (out / "README.md").read_text()
    assert len(result["history"]) == result["details"]["generations"] and "loss" in result["history"][0]
    assert result["details"]["optimizer"].startswith({"cma": "CMA-ES", "nevergrad": "NGOpt"}[method])
    assert f"--method {method}" in result["command"]
    card = (out / "README.md").read_text()
    assert f"**{pretty}**" in card and result["method_info"]["description"] in card
    assert f"{result['details']['generations']} generations of up to {result['details']['population']}" in card
    assert (out / "glue_trajectory.png").is_file()


@pytest.mark.parametrize("method, package", [("cma", "cma"), ("nevergrad", "nevergrad")])
def test_missing_package_names_the_extra(prep, method, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    passes = prep.objective.forward_passes
    with pytest.raises(GlueError, match=rf'pip install "hf-glue\[{package}\]"'):
        _run(prep, GlueConfig(method=method, steps=3))
    assert prep.objective.forward_passes == passes  # nothing was evaluated


def test_compare_runs_them_beside_glue_at_equal_cost(cls_experts, tmp_path):
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--methods", "glue", "cma",
                   "nevergrad", "--include-experts", "false", "--steps", "5", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [s["method"] for s in summary] == ["glue", "cma", "nevergrad"]
    # the same search budget, GLUE's; each then scores its own proposals beside the same simple starts
    assert len({s["forward_passes"] - s["validation_passes"] for s in summary}) == 1
    assert all(s["validation_passes"] > 0 for s in summary)
    table = proc.stdout.splitlines()
    assert any(line.split()[:1] == ["cma"] for line in table) and any(line.split()[:1] == ["nevergrad"] for line in table)
