"""mergekit_config.yml: the learned blend as a mergekit merge, checked by structure here (mergekit is not installed
in the test environment; scripts/check_mergekit_export.py runs mergekit on it and compares every tensor).

mergekit's rules the checks encode (mergekit 0.1.5, config.py ``evaluate_setting``): a parameter is a scalar or a
list of ``{filter, value}``; for a tensor the first entry whose filter is missing, ``*`` or a substring of the
tensor's name applies. Model references are ``path[@revision][+lora[@revision]]`` or the structured form.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from hf_glue import GlueConfig, merge_experts
from hf_glue.engine.matrix import group_of
from hf_glue.report.mergekit import mergekit_config

EXAMPLES = Path(__file__).resolve().parents[1] / "model_cards" / "examples"
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype"}


def mergekit_value(setting, name: str):
    """What mergekit resolves ``setting`` to for tensor ``name`` (written independently of hf-glue's code)."""
    if not isinstance(setting, list):
        return setting
    for entry in setting:
        assert set(entry) <= {"filter", "value"} and "value" in entry
        if entry.get("filter") in (None, "*") or entry["filter"] in name:
            return entry["value"]
    raise AssertionError(f"no entry applies to {name}")


def check_schema(config: dict) -> None:
    """The parts of mergekit's MergeConfiguration the export uses, with their types."""
    assert set(config) <= TOP_KEYS and isinstance(config["merge_method"], str)
    assert isinstance(config["models"], list) and config["models"]
    for model in config["models"]:
        assert set(model) == {"model", "parameters"}
        ref = model["model"]
        assert isinstance(ref, str) and ref.count("+") <= 1 and all(p.count("@") <= 1 for p in ref.split("+")) or (
            isinstance(ref, dict) and set(ref) <= {"model", "lora"} and set(ref["model"]) <= {"path", "revision"})
        weight = model["parameters"]["weight"]
        assert isinstance(weight, float) or (isinstance(weight, list) and "filter" not in weight[-1])
    assert config["parameters"]["normalize"] is False


def saved_names(folder: Path) -> list[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return [n for n in f.keys() if f.get_slice(n).get_dtype().startswith(("F", "BF"))]


def load(folder: Path) -> tuple[dict, dict, str]:
    text = (folder / "mergekit_config.yml").read_text()
    return yaml.safe_load(text), json.loads((folder / "merge_result.json").read_text()), text


@pytest.fixture(scope="module")
def merged(cls_experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    outs = {}
    for granularity, method in (("model", "glue"), ("block", "glue"), ("module", "uniform")):
        outs[granularity] = root / granularity
        merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=4, method=method, granularity=granularity),
                      output_dir=str(outs[granularity]))
    return outs


def test_model_granularity_is_a_linear_merge_of_the_pinned_experts(merged):
    config, result, text = load(merged["model"])
    check_schema(config)
    assert config["merge_method"] == "linear" and config["dtype"] == "float32" and "base_model" not in config
    assert [m["model"] for m in config["models"]] == [f"{e['id']}@{e['revision']}" for e in result["experts"]]
    assert [m["parameters"]["weight"] for m in config["models"]] == [
        result["coefficients"][e["name"]] for e in result["experts"]]  # exact: YAML keeps every digit
    assert "Not exact" not in text
    assert "mergekit_config.yml" in result["files"]  # listed: --overwrite-output-dir may replace it
    card = (merged["model"] / "README.md").read_text()
    assert "### Configuration" in card and f"```yaml\n{text.rstrip()}\n```" in card


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_every_saved_tensor_gets_its_groups_coefficient(merged, granularity):
    config, result, _ = load(merged[granularity])
    check_schema(config)
    groups = result["group_coefficients"]
    names = saved_names(merged[granularity])
    assert {group_of(n, granularity) for n in names} == set(groups)
    for model, expert in zip(config["models"], result["experts"]):
        weight = model["parameters"]["weight"]
        assert isinstance(weight, list) and len(weight) > 1
        for name in names:
            assert mergekit_value(weight, name) == groups[group_of(name, granularity)][expert["name"]], name


def test_filters_are_exact_where_substrings_collide():
    """Layer 1 vs 10, a nested model whose prefix contains another's, and module names that nest."""
    names = [f"{p}.layers.{i}.{m}.weight" for p in ("model", "text_model") for i in (1, 10)
             for m in ("attn", "attn.out")] + ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for granularity in ("block", "module", "tensor"):
        groups = list(dict.fromkeys(group_of(n, granularity) for n in names))
        result = {"method": "weights", "granularity": granularity, "experts": [{"name": "a", "id": "a"},
                                                                                {"name": "b", "id": "b"}],
                  "coefficients": {"a": 0.5, "b": 0.5},
                  "group_coefficients": {g: {"a": i / 100, "b": 1 - i / 100} for i, g in enumerate(groups)}}
        config = yaml.safe_load(mergekit_config(result, {n: "float32" for n in names}))
        check_schema(config)
        for model, expert in zip(config["models"], ("a", "b")):
            for name in names:
                expected = result["group_coefficients"][group_of(name, granularity)][expert]
                assert mergekit_value(model["parameters"]["weight"], name) == expected, (granularity, name)


def _combine_result(combine: str, weights: list[float], election: list[float]) -> dict:
    experts = [{"name": f"org/e{k}", "id": f"org/e{k}", "revision": str(k) * 40} for k in range(2)]
    return {"method": "glue", "granularity": "model", "experts": experts,
            "coefficients": {e["name"]: w for e, w in zip(experts, weights)},
            "base_model": {"name": "org/base", "id": "org/base", "revision": "b" * 40},
            "config": {"glue": {"combine": combine, "density": 0.4}, "experts": {"dtype": "bfloat16"}},
            "details": {"task_vectors": {"method": combine, "density": 0.4, "election_weights": election,
                                         "seed": 0}}}


@pytest.mark.parametrize("combine, method", [("task-arithmetic", "task_arithmetic"), ("ties", "ties"),
                                             ("dare", "dare_linear"), ("dare-ties", "dare_ties")])
def test_task_vectors_export_mergekits_method(combine, method):
    text = mergekit_config(_combine_result(combine, [0.8, 1.2], [0.4, 0.6]))
    config = yaml.safe_load(text)
    check_schema(config)
    assert config["merge_method"] == method and config["base_model"] == "org/base@" + "b" * 40
    assert config["parameters"] == {"normalize": False, "lambda": 1.0} and config["dtype"] == "bfloat16"
    for model, weight in zip(config["models"], (0.8, 1.2)):
        assert model["parameters"]["weight"] == weight
        assert model["parameters"].get("density") == (None if combine == "task-arithmetic" else 0.4)
    assert ("Not exact: DARE" in text) == combine.startswith("dare")
    assert "Not exact: hf-glue elected" not in text  # λ = 2 × the election weights: the same signs


def test_ties_says_when_mergekit_would_elect_other_signs():
    text = mergekit_config(_combine_result("ties", [0.9, 0.1], [0.5, 0.5]))
    assert "# Not exact: hf-glue elected the TIES signs with the weights [0.5, 0.5]" in text


def test_adapters_are_base_plus_lora_and_the_base_completes_the_sum():
    result = json.loads((EXAMPLES / "lora.merge_result.json").read_text())
    tensors = json.loads((EXAMPLES / "lora.tensors.json").read_text())
    base, groups = result["base_model"], result["group_coefficients"]
    config = yaml.safe_load(mergekit_config(result, tensors))
    check_schema(config)
    assert config["merge_method"] == "linear"
    assert [m["model"] for m in config["models"]] == [
        f"{base['id']}@{base['revision']}+{e['id']}@{e['revision']}" for e in result["experts"]]
    for model, expert in zip(config["models"], result["experts"]):
        for name in tensors:
            if group_of(name, "block") in groups:
                assert mergekit_value(model["parameters"]["weight"], name) == groups[group_of(name, "block")][
                    expert["name"]]
    # α on the simplex: Σ α_k (W + ΔW_k) = W + Σ α_k ΔW_k, no base entry; off it, the base gets 1 - Σα
    off = {**result, "granularity": "model", "group_coefficients": None,
           "coefficients": {e["name"]: 0.5 for e in result["experts"]}, "save_as": "adapter"}
    text = mergekit_config(off)
    config = yaml.safe_load(text)
    assert config["models"][-1] == {"model": f"{base['id']}@{base['revision']}", "parameters": {"weight": -0.5}}
    assert "1 - Σα" in text and "one LoRA adapter" in text


def test_names_the_string_syntax_would_split_use_the_structured_form():
    result = {"method": "uniform", "granularity": "model", "coefficients": {"a": 0.5, "b": 0.5},
              "experts": [{"name": "a", "id": "/data/run@2/a+b"}, {"name": "b", "id": "org/b", "revision": "c" * 40}]}
    config = yaml.safe_load(mergekit_config(result))
    check_schema(config)
    assert config["models"][0]["model"] == {"model": {"path": "/data/run@2/a+b"}}
    assert config["models"][1]["model"] == "org/b@" + "c" * 40
