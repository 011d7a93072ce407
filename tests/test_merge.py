"""Acceptance tests of `hf-glue merge` (issue: the GLUE pipeline end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from hf_glue import DataConfig, GlueConfig, merge_experts


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob(".*partial*"))


def test_cli_merge_learns_the_target_expert(cls_experts, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir", str(out),
                   "--steps", "60", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "merge_result.json"):
        assert (out / name).is_file(), name
    assert not _partials(tmp_path)
    result = json.loads((out / "merge_result.json").read_text())
    coefficients = result["coefficients"]
    assert max(coefficients, key=coefficients.get) == "org/expert-0"
    assert sum(coefficients.values()) == pytest.approx(1.0, abs=1e-9)
    assert "org/expert-0" in proc.stdout  # the summary printed for the user
    assert result["experts"][0]["id"] == "org/expert-0" and len(result["experts"][0]["revision"]) == 40
    assert len(result["dataset"]["revision"]) == 40 and result["dataset"]["eval_split"] == "test"
    assert len(result["history"]) == 60 and result["forward_passes"] >= 120
    assert "--steps 60" in result["command"]

    # far below the uniform blend on the held-out split
    uniform = merge_experts(cls_experts["ids"], "org/target", GlueConfig(method="uniform"))
    assert result["eval"]["loss"] < 0.25 * uniform.eval["loss"]
    assert result["eval"]["accuracy"] > uniform.eval["accuracy"] + 0.2

    # same seed, same coefficients (here through the Python API: one code path)
    again = merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=60, seed=0))
    assert again.coefficients == pytest.approx(coefficients, abs=1e-9)


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_merged_weights_are_the_convex_combination(kind, cls_experts, bf16_experts, tmp_path):
    ids = cls_experts["ids"] if kind == "float32" else bf16_experts
    out = tmp_path / "out"
    result = merge_experts(ids, "org/target", GlueConfig(steps=6, seed=1), output_dir=str(out))
    saved = json.loads((out / "merge_result.json").read_text())["coefficients"]
    merged = load_file(out / "model.safetensors")
    experts = [load_file(Path(p) / "model.safetensors") for p in _snapshot_paths(ids)]
    alphas = [saved[i] for i in ids]
    assert min(alphas) < 0.3 and max(alphas) < 1.0  # a genuine mixture, not one expert copied
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    for name, tensor in experts[0].items():
        assert merged[name].dtype == tensor.dtype
        if not tensor.dtype.is_floating_point:
            assert torch.equal(merged[name], tensor)
            continue
        assert tensor.dtype == dtype
        expected = sum(a * e[name].double() for a, e in zip(alphas, experts))
        got = merged[name].double()
        if kind == "float32":
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        else:  # one bfloat16 rounding of a float32-accumulated sum
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=2 ** -8)
    assert result.model is not None and result.model.dtype == dtype


def _snapshot_paths(ids):
    from huggingface_hub import snapshot_download

    return [snapshot_download(i) for i in ids]


def test_causal_lm_merge_prefers_target_domain(lm_experts):
    result = merge_experts(lm_experts["ids"], "org/lm-target", GlueConfig(steps=40, seed=0))
    assert max(result.coefficients, key=result.coefficients.get) == "org/lm-0"
    uniform = merge_experts(lm_experts["ids"], "org/lm-target", GlueConfig(method="uniform"))
    assert result.eval["perplexity"] < uniform.eval["perplexity"]


def test_block_granularity_records_group_coefficients(cls_experts, tmp_path):
    result = merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=20, granularity="block"),
                           output_dir=str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "merge_result.json").read_text())
    groups = saved["group_coefficients"]
    assert {"embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"} <= set(groups)
    for row in groups.values():
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-9) and min(row.values()) >= 0
    assert sum(saved["coefficients"].values()) == pytest.approx(1.0, abs=1e-9)
    assert result.alpha.shape == (len(groups), 3)


def test_auto_granularity_saves_the_granularity_it_chose(cls_experts, tmp_path):
    """--granularity auto on real experts: the engine holds blocks; the saved result names the granularity of the
    chosen α (model when every block has the same coefficients) and its blocks' coefficients when it is block."""
    result = merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=20, granularity="auto"),
                           output_dir=str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "merge_result.json").read_text())
    phases = saved["details"]["phases"]
    assert [p["steps"] for p in phases] == [10, 6] and phases[0]["groups"] == 1 and phases[1]["groups"] > 1
    per_block = bool((result.alpha != result.alpha[:1]).any())
    assert saved["granularity"] == ("block" if per_block else "model") == result.granularity
    assert ("group_coefficients" in saved) == per_block
    chosen = saved["details"]["selection"]["chosen"]
    assert per_block == chosen.startswith("search, per group")
    assert saved["config"]["glue"]["granularity"] == "auto"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`--granularity auto`: the first 10 steps searched one α shared by the whole model" in card
    assert f"the granularity saved (`{saved['granularity']}`)" in card


def test_local_folders_and_softmax_parametrization(cls_experts):
    folders = [str(p) for p in cls_experts["paths"]]
    result = merge_experts(folders, str(cls_experts["data_dir"]),
                           GlueConfig(steps=30, parametrization="softmax"))
    assert max(result.coefficients, key=result.coefficients.get) == folders[0]
    assert all(e["revision"] is None for e in result.experts)


def test_columns_named_explicitly(cls_experts):
    result = merge_experts(cls_experts["ids"][:2], "org/target-renamed", GlueConfig(steps=4),
                           data_config=DataConfig(text_column="utterance", label_column="verdict"))
    # the same rows under other column names: the named columns were read, so the search and the held-out scores
    # are those of the original target, bit for bit
    same = merge_experts(cls_experts["ids"][:2], "org/target", GlueConfig(steps=4))
    assert result.coefficients == same.coefficients and result.eval == same.eval


def test_revision_pins_and_is_recorded(cls_experts):
    from huggingface_hub import snapshot_download

    sha = Path(snapshot_download("org/expert-1")).name
    result = merge_experts(["org/expert-0", f"org/expert-1@{sha}"], "org/target", GlueConfig(method="uniform"))
    assert result.experts[1] == {"name": f"org/expert-1@{sha}", "id": "org/expert-1", "revision": sha,
                                 "license": None}  # its card states none
    assert f"org/expert-1@{sha}" in result.coefficients


def test_select_probe_trains_the_best_candidates_and_keeps_the_best_after(cls_experts, tmp_path):
    """--select probe: the best-scored candidates are each trained a few AdamW steps on the same batches; the answer
    is the one with the lowest validation loss after them, and the passes are counted in the method's cost."""
    config = GlueConfig(steps=10, validation_fraction=0.25, select="probe", probe_steps=3, probe_candidates=2,
                        probe_learning_rate=1e-3)
    by_loss = merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=10, validation_fraction=0.25))
    result = merge_experts(cls_experts["ids"], "org/target", config, output_dir=str(tmp_path / "out"))
    probe = result.details["probe"]
    assert probe["steps"] == 3 and probe["learning_rate"] == 1e-3 and len(probe["candidates"]) == 2
    ranked = sorted((c for c in by_loss.details["selection"]["candidates"]), key=lambda c: c["loss"])
    assert [c["name"] for c in probe["candidates"]][0] == ranked[0]["name"] == probe["by_loss"]
    after = {c["name"]: c["loss_after"] for c in probe["candidates"]}
    assert probe["chosen"] == min(after, key=after.get) == result.details["selection"]["chosen"]
    assert all(c["loss_after"] < c["loss_before"] for c in probe["candidates"])  # training on the target helps
    chosen = next(c for c in result.details["selection"]["candidates"] if c["name"] == probe["chosen"])
    assert result.coefficients == pytest.approx(chosen["coefficients"])
    assert result.backward_passes == 2 * 3
    assert result.forward_passes == by_loss.forward_passes + probe["forward_passes"]
    saved = json.loads((tmp_path / "out" / "merge_result.json").read_text())
    assert saved["details"]["selection"]["select"] == "probe"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`--select probe`: the 2 candidates with the lowest validation loss were each trained\n3 AdamW steps" in card
    assert "| Candidate | Validation loss | After 3 steps |" in card


@pytest.mark.parametrize("case, match", [
    ({"blend": "on-the-fly"}, "trains each candidate from its whole blend"),
    ({"method": "uniform"}, "--method uniform has none"),
    ({"validation_fraction": 0.0}, "pass --validation-fraction"),
])
def test_select_probe_refuses_what_it_cannot_do_before_resolving_anything(case, match, cls_experts, monkeypatch):
    from hf_glue import pipeline
    from hf_glue.config import ExpertsConfig
    from hf_glue.errors import GlueError

    monkeypatch.setattr(pipeline, "resolve_repos", lambda *a, **k: pytest.fail("resolved the experts first"))
    glue = {"steps": 2, "select": "probe", "validation_fraction": 0.25, **{k: v for k, v in case.items()
                                                                             if k != "blend"}}
    experts = ExpertsConfig(experts=cls_experts["ids"], **({"blend": case["blend"]} if "blend" in case else {}))
    with pytest.raises(GlueError, match=match):
        merge_experts(cls_experts["ids"], "org/target", GlueConfig(**glue), experts_config=experts)
