"""Task vectors (issue 10): full experts as deltas over their base, processed as mergekit's task arithmetic, TIES
and DARE, with coefficients in a box; `blend --from-result` re-applies them exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused, run_cli
from hf_glue import GlueConfig, merge_experts
from hf_glue.engine.task_vectors import process_deltas


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_task_arithmetic_with_convex_weights_is_the_plain_blend(cls_experts):
    """θ_base + Σ α_k (θ_k − θ_base) = Σ α_k θ_k when Σ α = 1: the two engines agree."""
    from hf_glue import ExpertsConfig

    weights = [0.5, 0.3, 0.2]
    plain = merge_experts(cls_experts["ids"], "org/target", GlueConfig(method="weights", weights=weights))
    vectors = merge_experts(cls_experts["ids"], "org/target",
                            GlueConfig(method="weights", weights=weights, combine="task-arithmetic"),
                            experts_config=ExpertsConfig(base_model="org/base"))
    a, b = plain.model.state_dict(), vectors.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert vectors.eval["loss"] == pytest.approx(plain.eval["loss"], abs=1e-5)


def test_ties_merge_is_the_definition_and_blend_reproduces_it(cls_experts, tmp_path):
    out = tmp_path / "ties"
    weights = [0.7, 0.5, 0.3]
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--base-model", "org/base",
                   "--combine", "ties", "--density", "0.5", "--method", "weights", "--weights", *map(str, weights),
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    merged = _weights(out)
    base = _weights(cls_experts["paths"][0].parent / "base")
    experts = [_weights(p) for p in cls_experts["paths"]]
    w = torch.tensor(weights)
    changed = 0
    for name, theta in base.items():
        if not theta.is_floating_point():
            continue
        tau = process_deltas(torch.stack([e[name] - theta for e in experts]), "ties", 0.5, w)
        expected = theta + (tau * w.view(-1, *[1] * theta.dim())).sum(0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        changed += int((tau == 0).any())
    assert changed > 0  # trimming really dropped entries
    result = json.loads((out / "merge_result.json").read_text())
    assert result["base_model"]["id"] == "org/base" and result["config"]["glue"]["combine"] == "ties"
    assert result["details"]["task_vectors"]["election_weights"] == weights
    card = (out / "README.md").read_text()
    assert "TIES" in card and "- ties" in card and "- org/base" in card

    proc = run_cli("blend", "--from-result", str(out / "merge_result.json"), "--output-dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    again = _weights(tmp_path / "b")
    for name in merged:
        torch.testing.assert_close(again[name], merged[name], rtol=0, atol=1e-6)


def test_glue_learns_dare_coefficients_in_the_box(cls_experts, tmp_path):
    out = tmp_path / "dare"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--base-model", "org/base",
                   "--combine", "dare", "--density", "0.7", "--steps", "20", "--bounds", "0", "1.2",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "merge_result.json").read_text())
    values = list(result["coefficients"].values())
    assert all(0 <= v <= 1.2 for v in values) and abs(sum(values) - 1) > 1e-3  # a box, not the simplex
    # the seeded drop mask is drawn again, identically, by blend (streaming, tensor by tensor)
    proc = run_cli("blend", "--from-result", str(out / "merge_result.json"), "--output-dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    merged, again = _weights(out), _weights(tmp_path / "b")
    for name in merged:
        torch.testing.assert_close(again[name], merged[name], rtol=0, atol=1e-6)


def test_base_from_the_experts_model_cards(cls_experts, tmp_path):
    folders = []
    for d, path in enumerate(cls_experts["paths"]):
        folder = tmp_path / f"e{d}"
        shutil.copytree(path, folder)
        (folder / "README.md").write_text("---\nbase_model: org/base\n---\n# expert\n")
        folders.append(str(folder))
    result = merge_experts(folders, "org/target", GlueConfig(method="uniform", combine="task-arithmetic"))
    assert result.base["id"] == "org/base"
    assert result.coefficients == pytest.approx({f: 1 / 3 for f in folders})


BAD = {
    "no_base": (["--combine", "ties"], ["--base-model", "base_model"]),
    "base_without_combine": (["--base-model", "org/base"], ["--combine"]),
    "weights_out_of_bounds": (["--combine", "ties", "--base-model", "org/base", "--method", "weights",
                               "--weights", "2", "0.5", "0.5"], ["--bounds", "2.0"]),
    "bad_bounds": (["--combine", "ties", "--bounds", "1", "0"], ["--bounds"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_task_vector_input_fails_early(case, cls_experts, tmp_path):
    extra, needles = BAD[case]
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir", str(out),
                   *extra)
    assert_refused(proc, needles, out)


def test_blend_reproduces_a_bfloat16_dare_merge(cls_experts, bf16_experts, tmp_path):
    """bfloat16 experts over a float32 base: blend rounds τ̂ and the base as the merge's matrix held them."""
    out = tmp_path / "dare"
    proc = run_cli("merge", "--experts", *bf16_experts, "--dataset", "org/target", "--base-model", "org/base",
                   "--combine", "dare", "--method", "weights", "--weights", "0.6", "0.5", "0.4",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("blend", "--from-result", str(out / "merge_result.json"), "--output-dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    merged, again = _weights(out), _weights(tmp_path / "b")
    for name in merged:
        assert merged[name].dtype == again[name].dtype == torch.bfloat16
        # float32 sums in another order may round to the neighbouring bfloat16 value, never further
        torch.testing.assert_close(again[name].float(), merged[name].float(), rtol=2 ** -7, atol=1e-6)


def test_compare_draws_one_dare_mask_per_seed(cls_experts, tmp_path):
    """With DARE every row depends on the seed's drop mask: each --seeds value gets its own, and the rows of
    processed experts are labelled as task vectors."""
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--base-model", "org/base",
                   "--combine", "dare", "--density", "0.5", "--methods", "uniform", "--seeds", "0", "1",
                   "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((out / "compare.json").read_text())["runs"]
    uniform = [r for r in runs if r["method"] == "uniform"]
    assert [r["seed"] for r in uniform] == [0, 1]
    assert uniform[0]["merged"]["loss"] != pytest.approx(uniform[1]["merged"]["loss"], abs=1e-6)
    labels = {r["method"] for r in runs}
    assert "task vector: org/expert-0" in labels and not any(m.startswith("expert: ") for m in labels)
