"""Baselines, fine-tuning, `hf-glue compare`, image classification (issue: baselines and compare)."""

from __future__ import annotations

import math

import json

import pytest
import torch

from conftest import run_cli
from hf_glue import FinetuneConfig, GlueConfig, merge_experts
from hf_glue.methods.proxy import logme

# the target is expert-0's domain, but expert-1 has by far the most data
DATA_SIZES = ["300", "3000", "1200"]


def test_compare_shows_glue_beats_data_size_and_uniform(cls_experts, tmp_path):
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--data-sizes",
                   *DATA_SIZES, "--steps", "40", "--seeds", "0", "1", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "compare.json").read_text())
    summary = {s["method"]: s for s in report["summary"]}
    assert set(summary) == {"glue", "uniform", "data-size", "proxy", "full-gradient", "expert: org/expert-0",
                            "expert: org/expert-1", "expert: org/expert-2"}
    loss = {m: s["merged"]["loss"]["mean"] for m, s in summary.items()}
    assert loss["glue"] < loss["data-size"] and loss["glue"] < loss["uniform"]
    assert loss["glue"] <= loss["full-gradient"] + 0.05  # within a small margin of the backprop reference
    assert summary["glue"]["merged"]["accuracy"]["n"] == 2  # two seeds
    assert summary["glue"]["backward_passes"] == 0 and summary["full-gradient"]["backward_passes"] == 40
    assert summary["data-size"]["coefficients"]["org/expert-1"] == pytest.approx(3000 / 4500)
    # the printed table and the chart
    assert "data-size" in proc.stdout and "full-gradient" in proc.stdout and "±" in proc.stdout
    assert (out / "compare.png").stat().st_size > 10_000
    assert report["card"]["rows"][0]["method"] == "glue"


def test_full_gradient_matches_finite_differences(cls_experts):
    from hf_glue.config import DataConfig as DC, ExpertsConfig as EC
    from hf_glue.methods.full_gradient import loss_and_grad
    from hf_glue.pipeline import batch_iterator, prepare
    from hf_glue.optim.spsa import make_parametrization

    glue = GlueConfig(batch_size=64)
    prep = prepare(EC(experts=cls_experts["ids"]), DC(dataset="org/target"), glue)
    batch = next(batch_iterator(prep, glue))
    for name, x in (("softmax", torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)),
                    ("simplex", torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))):
        param = make_parametrization(name)
        _, grad = loss_and_grad(prep.objective, param, x, batch)
        eps = 1e-3
        for i in range(3):
            e = torch.zeros_like(x)
            e[0, i] = eps
            up, _ = loss_and_grad(prep.objective, param, x + e, batch)
            down, _ = loss_and_grad(prep.objective, param, x - e, batch)
            assert float(grad[0, i]) == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=2e-3), (name, i)


@pytest.mark.parametrize("proxy", ["loss", "accuracy", "logme"])
def test_proxy_selects_the_target_expert(cls_experts, proxy):
    result = merge_experts(cls_experts["ids"], "org/target", GlueConfig(method="proxy", proxy=proxy))
    assert result.coefficients == {"org/expert-0": 1.0, "org/expert-1": 0.0, "org/expert-2": 0.0}
    assert set(result.details["proxy_scores"]) == set(cls_experts["ids"])


def test_logme_prefers_informative_features():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=gen)
    noise = torch.randn(200, 16, generator=gen)
    informative = noise * 0.1 + labels[:, None].float() * torch.ones(16)
    assert logme(informative, labels) > logme(noise, labels) + 0.5


def test_data_size_weights(cls_experts):
    result = merge_experts(cls_experts["ids"], "org/target", GlueConfig(method="data-size", data_sizes=[1, 2, 1]))
    assert result.coefficients == {"org/expert-0": 0.25, "org/expert-1": 0.5, "org/expert-2": 0.25}
    assert result.forward_passes == 0 and result.backward_passes == 0


def test_finetuning_improves_the_merge_and_the_card_keeps_both(cls_experts, tmp_path):
    """Two experts from other domains: the merge is poor on the target; one epoch of the Trainer helps."""
    out = tmp_path / "ft"
    proc = run_cli("merge", "--experts", "org/expert-1", "org/expert-2", "--dataset", "org/target", "--steps", "10",
                   "--finetune-epochs", "1", "--learning-rate", "3e-3", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "merge_result.json").read_text())
    before, after = result["eval_before"], result["eval_after"]
    assert after["accuracy"] > before["accuracy"] + 0.05 and after["loss"] < before["loss"]
    assert {"accuracy", "f1", "loss"} <= set(after)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/expert-1", "org/expert-2"] and card.data.base_model_relation == "merge"
    metrics = [m for r in card.data.to_dict()["model-index"][0]["results"] for m in r["metrics"]]
    assert {m["name"] for m in metrics} == {"accuracy (merged)", "accuracy (fine-tuned)"}
    assert "| fine-tuned |" in card.text and "| merged |" in card.text
    # the card says the weights are the fine-tuned ones, not θ(α)
    assert "fine-tuned from a merge" in card.text and "**not θ(α)**" in card.text
    # the console shows both stages, labelled, side by side
    lines = proc.stdout.splitlines()
    header = next(l for l in lines if l.split()[:1] == ["stage"]).split()
    rows = {l.split()[0]: l.split()[1:] for l in lines if l.split()[:1] in (["merged"], ["fine-tuned"])}
    for stage, metrics in (("merged", before), ("fine-tuned", after)):
        assert float(rows[stage][header.index("accuracy") - 1]) == pytest.approx(metrics["accuracy"], abs=1e-4)
    # the saved model is the fine-tuned one: not θ(α), the blend of the experts with the recorded coefficients
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    experts = [load_file(cls_experts["paths"][d] / "model.safetensors") for d in (1, 2)]
    alpha = [result["coefficients"][f"org/expert-{d}"] for d in (1, 2)]
    blend = {n: alpha[0] * experts[0][n] + alpha[1] * experts[1][n] for n, t in experts[0].items()
             if t.is_floating_point()}
    moved = max(float((saved[n].float() - blend[n]).abs().max()) for n in blend)
    assert moved > 1e-3, moved  # 1 epoch at 3e-3 moves weights far beyond rounding


def test_training_args_file(cls_experts, tmp_path):
    args = tmp_path / "args.yaml"
    args.write_text("weight_decay: 0.01\nwarmup_steps: 1\n")
    result = merge_experts(cls_experts["ids"][:2], "org/target", GlueConfig(method="uniform"),
                           finetune_config=FinetuneConfig(finetune_epochs=1, training_args=str(args)))
    assert result.eval_after is not None and result.config["finetune"]["training_args"] == str(args)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not_a_field": 1}')
    from hf_glue import GlueError

    with pytest.raises(GlueError, match="not_a_field"):
        merge_experts(cls_experts["ids"][:2], "org/target", GlueConfig(method="uniform"),
                      finetune_config=FinetuneConfig(finetune_epochs=1, training_args=str(bad)))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_image_classification_merges_end_to_end(image_experts, arch, tmp_path):
    out = tmp_path / arch
    result = merge_experts(image_experts[arch], image_experts["dataset"], GlueConfig(steps=30, seed=1),
                           output_dir=str(out))
    uniform = merge_experts(image_experts[arch], image_experts["dataset"], GlueConfig(method="uniform"))
    assert result.eval["loss"] < uniform.eval["loss"]
    assert sum(result.coefficients.values()) == pytest.approx(1.0)
    assert (out / "preprocessor_config.json").is_file() and (out / "model.safetensors").is_file()
    from transformers import AutoModelForImageClassification

    reloaded = AutoModelForImageClassification.from_pretrained(out)
    merged_sd = result.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, merged_sd[name])
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card


def test_a_bfloat16_image_blend_fine_tunes(image_experts):
    """--dtype bfloat16 with fine-tuning on a vision model: the collator's float32 pixels are cast to the model's
    dtype (a bfloat16 convolution refuses float32 inputs), for training and for the held-out metrics."""
    from hf_glue.config import ExpertsConfig

    ids = image_experts["resnet"]
    result = merge_experts(ids, image_experts["dataset"], GlueConfig(steps=2),
                           experts_config=ExpertsConfig(experts=ids, dtype="bfloat16"),
                           finetune_config=FinetuneConfig(finetune_epochs=1))
    assert next(result.model.parameters()).dtype == torch.bfloat16
    assert result.eval_after["accuracy"] >= 0 and math.isfinite(result.eval_after["loss"])


def test_compare_with_finetuning_reports_both_stages(cls_experts, tmp_path):
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--experts", "org/expert-1", "org/expert-2", "--dataset", "org/target",
                   "--methods", "glue", "uniform", "--include-experts", "false", "--steps", "5",
                   "--finetune-epochs", "1", "--learning-rate", "3e-3", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "compare.json").read_text())
    assert [s["method"] for s in report["summary"]] == ["glue", "uniform"]
    for s in report["summary"]:
        assert s["finetuned"]["accuracy"]["mean"] > s["merged"]["accuracy"]["mean"]
    assert "accuracy (fine-tuned)" in proc.stdout


def test_compare_peak_is_each_methods_own_memory(cls_experts, tmp_path, capsys):
    """Peak memory is measured above what the process held when the method started: ~0 for methods that only pick
    coefficients, not the whole process's peak (the loaded experts and everything before)."""
    from hf_glue.compare import run_compare
    from hf_glue.config import CompareConfig, DataConfig, ExpertsConfig
    from hf_glue.report.comparison import PEAK_COLUMN, PEAK_NOTE

    report = run_compare(ExpertsConfig(experts=cls_experts["ids"]), DataConfig(dataset="org/target"),
                         GlueConfig(steps=3, data_sizes=[1, 2, 1]), FinetuneConfig(),
                         CompareConfig(methods=["glue", "uniform", "data-size"], output_dir=str(tmp_path / "cmp")))
    runs = {r["method"]: r for r in report["runs"]}
    for label in ("uniform", "data-size", "expert: org/expert-0", "expert: org/expert-2"):
        run = runs[label]
        assert run["memory_before_bytes"] > 50 * 2**20  # the process: torch, the loaded experts, ...
        assert run["peak_memory_bytes"] < 0.05 * run["memory_before_bytes"], label  # ... is not the method's
    assert runs["glue"]["peak_memory_bytes"] is not None
    out = capsys.readouterr().out
    assert PEAK_COLUMN in out and PEAK_NOTE in out
    assert report["card"]["note"] == PEAK_NOTE


def test_merge_prints_the_per_group_coefficients(cls_experts, capsys):
    from hf_glue.commands.merge import print_summary

    result = merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=2, granularity="block"))
    groups = result.group_coefficients
    assert 2 < len(groups) <= 11  # the tiny BERT: embeddings, 2 layers, pooler, classifier, ...
    print_summary(result, None)
    lines = capsys.readouterr().out.splitlines()
    assert any(l.startswith("Per group (granularity block") for l in lines)
    for group, row in groups.items():
        line = next(l for l in lines if l.split()[:1] == [group])
        assert line.split()[1:] == [f"{row[e]:.4f}" for e in cls_experts["ids"]]


def test_many_groups_print_compactly():
    from hf_glue.commands.merge import format_groups

    groups = {f"model.layers.{i}": {"a": i / 100, "b": 1 - i / 100} for i in range(40)}
    lines = format_groups(groups, ["a", "b"]).splitlines()
    assert lines[0].split() == ["group", "a", "b"]
    shown = [l.split()[0] for l in lines[1:] if l.split()[0].startswith("model.")]
    assert shown == [f"model.layers.{i}" for i in (*range(6), *range(36, 40))]
    assert any("30 more groups" in l for l in lines)


def test_compare_scores_baselines_and_records_the_finetuning_curve(cls_experts, lm_experts, tmp_path):
    """--baselines: a checkpoint scored and fine-tuned as a start beside the blends (here a copy of expert 0,
    which must score exactly as expert 0 does); evaluation during fine-tuning is kept as a curve."""
    from conftest import HUB_CACHE
    from hf_glue import testing

    testing.publish_to_cache(cls_experts["paths"][0], "org/copy-of-0", HUB_CACHE)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"eval_strategy": "steps", "eval_steps": 4}))
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--methods", "uniform",
                   "--baselines", "org/copy-of-0", "--finetune-epochs", "1", "--max-train-samples", "64",
                   "--training-args", str(args), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "compare.json").read_text())
    summary = {s["method"]: s for s in report["summary"]}
    assert list(summary)[0] == "model: org/copy-of-0"
    for stage in ("merged", "finetuned"):
        assert summary["model: org/copy-of-0"][stage]["accuracy"]["mean"] == pytest.approx(
            summary["expert: org/expert-0"][stage]["accuracy"]["mean"], abs=1e-6), stage
    curve = [r for r in report["runs"] if r["method"] == "uniform"][0]["finetune_curve"]
    assert [p["step"] for p in curve] == [4, 8] and 0.0 <= curve[0]["accuracy"] <= 1.0
    assert "model: org/copy-of-0" in proc.stdout

    # another architecture is refused by name, before any method runs
    proc = run_cli("compare", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--baselines",
                   lm_experts["ids"][0], "--output-dir", str(tmp_path / "bad"))
    assert proc.returncode != 0 and lm_experts["ids"][0] in proc.stderr and "--baselines" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad" / "compare.json").exists()
