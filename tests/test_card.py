"""The model card parses with huggingface_hub and carries the merge metadata; sharded experts load."""

from __future__ import annotations

import json
import os

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


def test_card_says_how_to_use_the_merge_and_names_it(merged):
    """The full merge's card has a runnable loading snippet and names the model by its folder (its repo id once
    pushed) in the model index, not a generic name; the experts' cards state no licence, and the card says so."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(merged / "README.md")
    assert "## How to use" in card.text
    assert 'AutoModelForSequenceClassification.from_pretrained("merged")' in card.text
    assert 'pipeline("text-classification", model="merged")' in card.text
    assert card.data.to_dict()["model-index"][0]["name"] == "merged"
    assert "license" not in card.data.to_dict() and "## Licence" in card.text and "not stated" in card.text
    import subprocess
    import sys

    from conftest import TEST_ENV

    snippet = card.text.split("## How to use\n\n```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", snippet + "print(pipe('a b c')[0]['label'])"], cwd=merged.parent,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **TEST_ENV})
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]  # the snippet runs as written


def test_card_carries_the_licence_the_experts_agree_on(cls_experts, tmp_path):
    """Experts whose cards state one licence give the merge that licence; differing ones give none and a note."""
    import shutil

    from huggingface_hub import ModelCard

    ids = []
    for d, licence in enumerate(("apache-2.0", "apache-2.0", "mit")):
        folder = shutil.copytree(cls_experts["paths"][d], tmp_path / f"lic-{d}")
        (folder / "README.md").write_text(f"---\nlicense: {licence}\n---\n# expert {d}\n")
        ids.append(str(folder))
    merge_experts(ids[:2], "org/target", GlueConfig(steps=2), output_dir=str(tmp_path / "agree"))
    card = ModelCard.load(tmp_path / "agree" / "README.md")
    assert card.data.to_dict()["license"] == "apache-2.0" and "## Licence" not in card.text
    merge_experts(ids[1:], "org/target", GlueConfig(steps=2), output_dir=str(tmp_path / "differ"))
    card = ModelCard.load(tmp_path / "differ" / "README.md")
    assert "license" not in card.data.to_dict() and "apache-2.0" in card.text and "mit" in card.text


def test_card_template_lives_in_the_top_level_model_cards_folder():
    """The template is model_cards/merge.md at the top of the repository, the only copy (tests/test_packaging.py
    checks that wheels and editable installs ship it as hf_glue.model_cards)."""
    from pathlib import Path

    from hf_glue.report.card import TEMPLATE

    root = Path(__file__).resolve().parents[1]
    assert TEMPLATE.resolve() == (root / "model_cards" / "merge.md").resolve()
    assert not (root / "src" / "hf_glue" / "model_cards").exists()


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


def test_card_reproduce_command_carries_the_hub_variables(merged):
    """Inputs resolved from a non-default cache, offline: the recorded command sets both, so it reproduces."""
    result = json.loads((merged / "merge_result.json").read_text())
    prefix = f"HF_HUB_CACHE={HUB_CACHE} HF_HUB_OFFLINE=1 hf-glue merge "
    assert result["command"].startswith(prefix)
    card = (merged / "README.md").read_text()
    assert card.split("## Reproduce", 1)[1].split("```bash\n", 1)[1].startswith(prefix)


def test_hub_environment_names_only_the_hub_settings(monkeypatch):
    from huggingface_hub import constants

    from hf_glue.config import hub_environment

    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    monkeypatch.setattr(constants, "ENDPOINT", "https://user:hf_secret_pw@hub.example.org:8443")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/data/hf cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    env = hub_environment()
    assert env == "HF_HUB_CACHE='/data/hf cache' HF_ENDPOINT=https://hub.example.org:8443 "
    assert "secret" not in env and "TOKEN" not in env
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.expanduser("~/.cache/huggingface/hub"))
    assert hub_environment() == ""


def test_local_paths_with_spaces_render_as_code_not_links(cls_experts, tmp_path):
    """Local experts and dataset: shown as code (a path is no URL), and no Hub variables in the command."""
    import shutil

    from huggingface_hub import ModelCard

    folder = tmp_path / "my experts"
    experts = []
    for d in range(2):
        shutil.copytree(cls_experts["paths"][d], folder / f"expert {d}")
        experts.append(str(folder / f"expert {d}"))
    data = shutil.copytree(cls_experts["data_dir"], tmp_path / "target data")
    out = tmp_path / "out"
    merge_experts(experts, str(data), GlueConfig(method="uniform", granularity="block"), output_dir=str(out))
    card = ModelCard.load(out / "README.md")
    for path in experts:
        assert f"| `{path}` | `local` |" in card.text
        assert f"]({path})" not in card.text
    assert f"| Group | `{experts[0]}` | `{experts[1]}` |" in card.text
    assert f"- Dataset: `{data}`" in card.text
    assert card.data.base_model is None
    result = json.loads((out / "merge_result.json").read_text())
    assert not result["command"].startswith("HF_")  # nothing resolved through the Hub


def test_card_of_a_fine_tuned_merge_does_not_call_it_the_blend():
    from hf_glue.report.card import generate_card

    result = {"method": "uniform", "task": "sequence-classification", "granularity": "model",
              "experts": [{"name": "org/a", "id": "org/a", "revision": "1" * 40},
                          {"name": "org/b", "id": "org/b", "revision": "2" * 40}],
              "coefficients": {"org/a": 0.5, "org/b": 0.5},
              "dataset": {"id": "org/t", "revision": "3" * 40, "train_split": "train", "eval_split": "test"},
              "eval": {"accuracy": 0.5}, "command": "hf-glue merge ...", "versions": {}}
    merged = generate_card(result)
    assert "This model is a **merge**" in merged and "fine-tuned from a merge" not in merged
    finetuned = generate_card({**result, "eval_before": {"accuracy": 0.5}, "eval_after": {"accuracy": 0.9},
                               "config": {"finetune": {"finetune_epochs": 2.0, "learning_rate": 0.003}}})
    assert "This model is a **merge**" not in finetuned
    assert "**fine-tuned from a merge**" in finetuned and "**not θ(α)**" in finetuned
    assert "after 2 epoch(s) of fine-tuning" in finetuned and "learning rate 0.003" in finetuned
    assert "## Coefficients of the merge (before fine-tuning)" in finetuned


def test_trajectory_plot_marks_the_returned_alpha_on_labelled_axes(tmp_path, monkeypatch):
    """The card's plot: the returned α starred at the end, both axes labelled, the losses on a log scale."""
    import matplotlib.pyplot as plt

    from hf_glue.report.plots import plot_trajectories

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    history = [{"step": t, "loss_plus": 0.5 / (t + 1), "loss_minus": 0.6 / (t + 1),
                "coefficients": {"a": 0.5 + t / 40, "b": 0.5 - t / 40}} for t in range(10)]
    result = {"history": history, "experts": [{"name": "a"}, {"name": "b"}], "coefficients": {"a": 0.7, "b": 0.3}}
    assert plot_trajectories(result, tmp_path / "t.png").is_file()
    ax_a, ax_l = figures[0].axes
    stars = [line for line in ax_a.lines if line.get_marker() == "*" and len(line.get_ydata()) == 1]
    assert sorted(float(line.get_ydata()[0]) for line in stars) == [0.3, 0.7]
    assert ax_l.get_yscale() == "log" and ax_a.get_ylabel() and ax_l.get_ylabel() and ax_a.get_xlabel() == "step"
