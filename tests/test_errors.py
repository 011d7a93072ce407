"""Bad input: one clear line naming the culprit, non-zero exit, no traceback, no output folder."""

from __future__ import annotations

import shutil

import pytest

from conftest import HUB_CACHE, run_cli
from hf_glue import testing


@pytest.fixture(scope="session")
def odd_experts(cls_experts, build_root) -> dict:
    """Experts that must be refused next to org/expert-0."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cls_experts["paths"][0])
    # wider hidden size
    wide = testing.tiny_model("sequence-classification", len(tok), seed=0)
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(**{**wide.config.to_dict(), "hidden_size": 48, "intermediate_size": 96})
    path = build_root / "wide"
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    testing.publish_to_cache(path, "org/wide", HUB_CACHE)
    # same weights, a different tokenizer
    other_tok = build_root / "other-tok"
    shutil.copytree(cls_experts["paths"][1], other_tok, dirs_exist_ok=True)
    testing.make_tokenizer([f"x{i}" for i in range(len(tok) - 4)]).save_pretrained(other_tok)
    testing.publish_to_cache(other_tok, "org/other-tokenizer", HUB_CACHE)
    # pickled weights only
    pickled = build_root / "pickled"
    shutil.copytree(cls_experts["paths"][2], pickled, dirs_exist_ok=True)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    testing.publish_to_cache(pickled, "org/pickled", HUB_CACHE)
    return {"wide": "org/wide", "tokenizer": "org/other-tokenizer", "pickled": "org/pickled"}


CASES = {
    "shape": (["org/expert-0", "org/wide"], "org/target", [], ["org/wide", "shape"]),
    "model_type": (["org/expert-0", "org/lm-0"], "org/target", [], ["org/lm-0", "gpt2"]),
    "tokenizer": (["org/expert-0", "org/other-tokenizer"], "org/target", [], ["org/other-tokenizer", "tokenizer.json"]),
    "missing_repo": (["org/expert-0", "org/does-not-exist"], "org/target", [], ["org/does-not-exist"]),
    "missing_dataset": (["org/expert-0", "org/expert-1"], "org/no-such-data", [], ["org/no-such-data"]),
    "columns": (["org/expert-0", "org/expert-1"], "org/target-renamed", [], ["utterance", "verdict", "--text-column"]),
    "bad_column": (["org/expert-0", "org/expert-1"], "org/target-renamed", ["--text-column", "txt"],
                   ["'txt'", "utterance"]),
    "pickle": (["org/expert-0", "org/pickled"], "org/target", [], ["org/pickled", "--allow-pickle"]),
    "one_expert": (["org/expert-0"], "org/target", [], ["at least two experts"]),
    "data_sizes": (["org/expert-0", "org/expert-1"], "org/target", ["--init", "data-size", "--data-sizes", "5"],
                   ["--data-sizes", "2 experts"]),
    "method": (["org/expert-0", "org/expert-1"], "org/target", ["--method", "magic"], ["'magic'", "glue"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_early_and_clearly(case, cls_experts, lm_experts, odd_experts, tmp_path):
    experts, dataset, extra, needles = CASES[case]
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", *experts, "--dataset", dataset, "--output-dir", str(out), *extra)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists() and not list(tmp_path.glob(".*"))
    assert "SPSA" not in proc.stderr  # refused before any optimisation started


def test_named_columns_then_work(cls_experts, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", "org/expert-0", "org/expert-1", "--dataset", "org/target-renamed",
                   "--text-column", "utterance", "--label-column", "verdict", "--output-dir", str(out), "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()


def test_allow_pickle_loads_bin_weights(cls_experts, odd_experts):
    from hf_glue import ExpertsConfig, GlueConfig, merge_experts

    import torch
    from safetensors.torch import load_file

    result = merge_experts(["org/expert-0", "org/pickled"], "org/target", GlueConfig(method="uniform"),
                           experts_config=ExpertsConfig(allow_pickle=True))
    assert result.coefficients == {"org/expert-0": 0.5, "org/pickled": 0.5}
    # the .bin weights were read: the blend is the mean of expert-0 and expert-2 (the pickled copy's source)
    first, second = (load_file(cls_experts["paths"][d] / "model.safetensors") for d in (0, 2))
    merged = result.model.state_dict()
    floats = [n for n, t in first.items() if t.is_floating_point() and not torch.equal(t, second[n])]
    assert floats
    for name in floats:
        torch.testing.assert_close(merged[name], (first[name] + second[name]) / 2)


def test_task_that_would_replace_the_experts_head_is_refused():
    from hf_glue.errors import GlueError
    from hf_glue.tasks import detect_task

    config = {"architectures": ["BertForSequenceClassification"], "model_type": "bert"}
    with pytest.raises(GlueError, match="with a sequence-classification head; AutoModelForCausalLM would replace"):
        detect_task(config, "causal-lm")
    assert detect_task(config, "sequence-classification").name == "sequence-classification"
    assert detect_task({"architectures": ["BertModel"], "model_type": "bert"}, "causal-lm").name == "causal-lm"


def test_adapters_bring_their_own_head_over_an_llm_base():
    """LoRA classification adapters over a causal LM: the base's LM head is not refused (the adapters save theirs)."""
    from hf_glue.errors import GlueError
    from hf_glue.tasks import detect_task

    llm = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    with pytest.raises(GlueError, match="with a causal-lm head"):
        detect_task(llm, "sequence-classification")
    assert detect_task(llm, "sequence-classification", heads_from_config=False).name == "sequence-classification"


def test_row_numbers_name_the_loaded_split_after_a_carve_out():
    """Errors count rows of the split as loaded, also in the shuffled 10 % held out of it or a selection."""
    import datasets

    from hf_glue.tasks.data import source_row

    rows = datasets.Dataset.from_dict({"x": list(range(20))})
    held_out = rows.train_test_split(test_size=0.3, seed=0)["test"]
    assert [source_row(held_out, i) for i in range(len(held_out))] == held_out["x"] != sorted(held_out["x"])
    picked = rows.select([7, 3])
    assert [source_row(picked, 0), source_row(picked, 1), source_row(rows, 5)] == [7, 3, 5]


@pytest.mark.parametrize("spec", ["data/target.csv", "target.jsonl", "./experts/a", "runs/2026/expert", "~/x"])
def test_missing_local_path_is_no_such_file_not_a_hub_id(spec, tmp_path, monkeypatch):
    """A path that does not exist is reported as a missing file, naming it, not as a Hub id missing from the cache
    with `hf download` advice."""
    from hf_glue import DataConfig
    from hf_glue.errors import GlueError
    from hf_glue.tasks.data import load_target

    monkeypatch.chdir(tmp_path)
    with pytest.raises(GlueError, match="no such file or folder") as err:
        load_target(DataConfig(dataset=spec))
    assert repr(spec) in str(err.value) and "hf download" not in str(err.value)


@pytest.mark.parametrize("spec", ["org/name", "gpt2", "org/name@refs/pr/1", "org/model.v2", "org/name@main"])
def test_hub_ids_are_not_taken_for_paths(spec):
    from hf_glue.io.hub import looks_like_path

    assert not looks_like_path(spec)


def test_missing_local_dataset_is_reported_before_the_experts_are_fetched(cls_experts, tmp_path, monkeypatch):
    """A dataset path that does not exist is named first, before any expert is resolved (which could download)."""
    from hf_glue import DataConfig, ExpertsConfig, GlueConfig
    from hf_glue.errors import GlueError
    from hf_glue.pipeline import prepare

    monkeypatch.chdir(tmp_path)
    experts = ExpertsConfig(experts=["org/does-not-exist-a", "org/does-not-exist-b"])
    with pytest.raises(GlueError, match="dataset 'data/target.csv': no such file or folder"):
        prepare(experts, DataConfig(dataset="data/target.csv"), GlueConfig())
