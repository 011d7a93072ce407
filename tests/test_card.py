"""The model card parses with huggingface_hub and carries the merge metadata; sharded experts load."""

from __future__ import annotations

import json

import pytest

from conftest import HUB_CACHE
from hf_glue import GlueConfig, merge_experts, testing


@pytest.fixture(scope="module")
def merged(cls_experts, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "merged"
    merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=10), output_dir=str(out))
    return out


def test_card_parses_with_the_merge_metadata(merged, cls_experts):
    from huggingface_hub import ModelCard

    card = ModelCard.load(merged / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == cls_experts["ids"]
    assert data["base_model_relation"] == "merge"
    assert {"merge", "hf-glue"} <= set(data["tags"])
    assert data["datasets"] == ["org/target"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    result = json.loads((merged / "merge_result.json").read_text())
    for expert in result["experts"]:
        row = next(l for l in card.text.splitlines() if l.startswith(f"| [{expert['id']}]"))
        assert f"{result['coefficients'][expert['name']]:.4f}" in row and expert["revision"] in row
    assert result["command"] in card.text
    assert "glue_trajectory.png" in card.text and (merged / "glue_trajectory.png").is_file()
    metric = data["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "accuracy" and metric["value"] == pytest.approx(result["eval"]["accuracy"], abs=1e-6)


def test_card_template_ships_in_the_package():
    from importlib.resources import files

    assert files("hf_glue").joinpath("model_cards/merge.md").is_file()


def test_sharded_experts_merge_like_single_files(cls_experts, build_root):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ids = []
    for d, path in enumerate(cls_experts["paths"][:2]):
        out = build_root / f"sharded-{d}"
        AutoModelForSequenceClassification.from_pretrained(path).save_pretrained(out, max_shard_size="30KB")
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
        assert (out / "model.safetensors.index.json").is_file()
        testing.publish_to_cache(out, f"org/sharded-{d}", HUB_CACHE)
        ids.append(f"org/sharded-{d}")
    sharded = merge_experts(ids, "org/target", GlueConfig(steps=8, seed=2))
    single = merge_experts(cls_experts["ids"][:2], "org/target", GlueConfig(steps=8, seed=2))
    assert list(sharded.coefficients.values()) == pytest.approx(list(single.coefficients.values()), abs=1e-6)
