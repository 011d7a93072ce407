"""`hf-glue blend`: the streamed output is Σ w_k θ_k, byte-compatible with safetensors and from_pretrained."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from hf_glue.engine.streaming import SafetensorsReader, SafetensorsWriter


def test_reader_and_writer_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6),
               "empty": torch.empty(0, 2), "flag": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "in.safetensors")
    reader = SafetensorsReader(tmp_path / "in.safetensors")
    for name, t in tensors.items():
        assert torch.equal(reader.read(name), t) and reader.read(name).dtype == t.dtype
    reader.close()
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for t in tensors.values():
        writer.write(t)
    writer.close()
    again = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(again[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_blend_command_writes_the_convex_combination(cls_experts, tmp_path, dtype):
    out = tmp_path / "blended"
    proc = run_cli("blend", "--experts", *cls_experts["ids"], "--weights", "0.5", "0.3", "0.2",
                   "--output-dir", str(out), "--dtype", dtype, "--max-shard-size", "40KB")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 40 KB
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    experts = [load_file(p / "model.safetensors") for p in cls_experts["paths"]]
    for name, t in experts[0].items():
        if not t.dtype.is_floating_point:
            assert torch.equal(merged[name], t)
            continue
        expected = (0.5 * experts[0][name] + 0.3 * experts[1][name] + 0.2 * experts[2][name])
        if dtype == "auto":
            torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)
        else:
            assert merged[name].dtype == torch.bfloat16
            assert torch.equal(merged[name], expected.to(torch.bfloat16))
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "0.5000" in card


def test_blend_from_result_reproduces_a_merge(cls_experts, tmp_path):
    from hf_glue import GlueConfig, merge_experts

    merged = tmp_path / "merged"
    merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=10, granularity="block"),
                  output_dir=str(merged))
    out = tmp_path / "again"
    proc = run_cli("blend", "--from-result", str(merged / "merge_result.json"), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(merged / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    result = json.loads((out / "merge_result.json").read_text())
    assert result["group_coefficients"] and result["method"] == "glue"
    # the card tells what learning α cost and how θ(α) scored, not "0 forward passes" and no metrics
    source = json.loads((merged / "merge_result.json").read_text())
    card = (out / "README.md").read_text()
    assert f"cost {source['forward_passes']} forward passes" in card and not re.search(r"(?<!\d)0 forward passes", card)
    assert f"{source['eval']['accuracy']:.4f}" in card and "## Results on the held-out split" in card


def test_blend_refuses_bad_weights(cls_experts, tmp_path):
    proc = run_cli("blend", "--experts", *cls_experts["ids"][:2], "--weights", "0.7", "0.4",
                   "--output-dir", str(tmp_path / "o"))
    assert proc.returncode != 0 and "sum to 1" in proc.stderr and not (tmp_path / "o").exists()


def _blend_main(*args: str) -> int:
    from hf_glue.commands import main

    return main(["blend", *args])


@pytest.fixture(scope="module")
def merged_block(cls_experts, tmp_path_factory):
    """A block-granularity merge (with held-out metrics) to re-apply with --from-result."""
    from hf_glue import GlueConfig, merge_experts

    out = tmp_path_factory.mktemp("source") / "merged"
    merge_experts(cls_experts["ids"], "org/target", GlueConfig(steps=3, granularity="block"), output_dir=str(out))
    return out


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_blend_refuses_non_finite_weights(cls_experts, tmp_path, capsys):
    assert _blend_main("--experts", *cls_experts["ids"][:2], "--weights", "nan", "nan",
                       "--output-dir", str(tmp_path / "o")) == 1
    assert "finite" in _one_error(capsys) and not (tmp_path / "o").exists()


EDITS = {
    "nan": lambda r: r["coefficients"].update({k: float("nan") for k in r["coefficients"]}),
    "negative": lambda r: r["coefficients"].update({k: -1.0 for k in r["coefficients"]}),
    "sum": lambda r: r["coefficients"].update({k: 0.5 for k in r["coefficients"]}),
    "group": lambda r: next(iter(r["group_coefficients"].values())).update(
        {k: v for k, v in zip(r["coefficients"], (-1.0, -1.0, 3.0))}),
    "keys": lambda r: r["coefficients"].update({"org/other": 0.0}),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_blend_from_result_refuses_edited_coefficients(merged_block, tmp_path, capsys, edit):
    result = json.loads((merged_block / "merge_result.json").read_text())
    EDITS[edit](result)
    source = tmp_path / "merge_result.json"
    source.write_text(json.dumps(result))  # bare NaN, as older versions wrote
    assert _blend_main("--from-result", str(source), "--output-dir", str(tmp_path / "o")) == 1
    assert "--from-result" in _one_error(capsys)
    assert not (tmp_path / "o").exists()


def test_blend_to_another_dtype_labels_config_metrics_and_keys(merged_block, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert _blend_main("--from-result", str(merged_block / "merge_result.json"), "--dtype", "bfloat16",
                       "--output-dir", str(out)) == 0
    source = json.loads((merged_block / "merge_result.json").read_text())
    result = json.loads((out / "merge_result.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config.get("torch_dtype", "bfloat16") == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values() if t.is_floating_point()} == {
        torch.bfloat16}
    # the source's float32 metrics were not measured on these weights: kept apart, not in the card
    assert result["eval"] == {} and result["source_eval"]["eval"] == source["eval"]
    assert f"{source['eval']['loss']:.4f}" not in (out / "README.md").read_text()
    # coefficients keep the source's keys; the experts list carries the pinned revisions
    assert result["coefficients"] == source["coefficients"]
    assert set(next(iter(result["group_coefficients"].values()))) == set(source["coefficients"])
    assert [e["name"] for e in result["experts"]] == [e["name"] for e in source["experts"]]
    assert [e["revision"] for e in result["experts"]] == [e["revision"] for e in source["experts"]]
    # the same dtype reproduces the measured weights: the metrics hold
    again = tmp_path / "same"
    assert _blend_main("--from-result", str(merged_block / "merge_result.json"), "--output-dir", str(again)) == 0
    assert json.loads((again / "merge_result.json").read_text())["eval"] == source["eval"]
