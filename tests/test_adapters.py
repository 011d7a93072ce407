"""LoRA adapters as experts (issue 10): the blend equals PEFT's own combination, both save forms load and agree,
bad adapters are refused early, and GLUE finds the right blend over adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_refused, run_cli
from test_distributed import one_and_two_processes

ALPHA = [0.5, 0.3, 0.2]


def _batch(lora_experts):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lora_experts["base"])
    rows = [json.loads(line) for line in (lora_experts["data_dir"] / "test.jsonl").read_text().splitlines()[:16]]
    return tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)


def _held_out_loss(model, lora_experts) -> float:
    """Mean cross-entropy of ``model`` over the target's whole test split."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lora_experts["base"])
    rows = [json.loads(line) for line in (lora_experts["data_dir"] / "test.jsonl").read_text().splitlines()]
    batch = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in rows])))


def _peft_reference(lora_experts, alpha: list[float], folder: Path) -> torch.nn.Module:
    """PEFT's own weighted combination: add_weighted_adapter(..., "cat") over the adapters' LoRA factors. PEFT
    refuses adapters with modules_to_save there, so they are loaded from copies without their heads, and the
    head is set to Σ α_k head_k."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"])
    model, heads = None, {}
    for k, path in enumerate(lora_experts["paths"]):
        copy = folder / f"a{k}"
        copy.mkdir()
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        config.update(modules_to_save=None, task_type=None)
        (copy / "adapter_config.json").write_text(json.dumps(config))
        state = load_file(Path(path) / "adapter_model.safetensors")
        save_file({n: t for n, t in state.items() if "lora_" in n}, copy / "adapter_model.safetensors")
        if model is None:
            model = PeftModel.from_pretrained(base, copy, adapter_name=f"a{k}")
        else:
            model.load_adapter(copy, adapter_name=f"a{k}")
        for name in ("classifier.weight", "classifier.bias"):
            heads[name] = heads.get(name, 0) + alpha[k] * state[f"base_model.model.{name}"]
    model.add_weighted_adapter([f"a{k}" for k in range(len(alpha))], alpha, "mix", combination_type="cat")
    model.set_adapter("mix")
    classifier = model.base_model.model.classifier
    classifier.weight.data, classifier.bias.data = heads["classifier.weight"], heads["classifier.bias"]
    return model.eval()


def test_merged_and_adapter_saves_equal_peft_cat(lora_experts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    weights = [str(a) for a in ALPHA]
    outputs = {}
    for save_as in ("merged", "adapter"):
        out = tmp_path / save_as
        proc = run_cli("merge", "--experts", *lora_experts["ids"], "--dataset", lora_experts["dataset"],
                       "--method", "weights", "--weights", *weights, "--save-as", save_as, "--output-dir", str(out))
        assert proc.returncode == 0, proc.stderr
        outputs[save_as] = out
    batch = _batch(lora_experts)
    with torch.no_grad():
        reference = _peft_reference(lora_experts, ALPHA, tmp_path)(**batch).logits
        merged_model = AutoModelForSequenceClassification.from_pretrained(outputs["merged"]).eval()
        merged = merged_model(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"])
        base_logits = base(**batch).logits
        adapter = PeftModel.from_pretrained(base, outputs["adapter"]).eval()(**batch).logits
    assert not (outputs["merged"] / "adapter_config.json").exists()
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter, merged, rtol=0, atol=1e-5)
    assert (merged - base_logits).abs().max() > 1e-1  # the blend is not trivially the base

    config = json.loads((outputs["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/lora-base" and len(config["revision"]) == 40
    assert config["modules_to_save"] == ["classifier"]
    for save_as, relation in (("adapter", "adapter"), ("merged", "merge")):
        result = json.loads((outputs[save_as] / "merge_result.json").read_text())
        assert result["base_model"]["id"] == "org/lora-base" and result["save_as"] == save_as
        assert [e["id"] for e in result["experts"]] == lora_experts["ids"]
        assert all(len(e["revision"]) == 40 for e in result["experts"])
        assert result["coefficients"] == pytest.approx(dict(zip(lora_experts["ids"], ALPHA)))
        card = (outputs[save_as] / "README.md").read_text()
        assert f"base_model_relation: {relation}" in card and "org/lora-base" in card


def test_block_granularity_saves_agree(lora_experts, tmp_path):
    """Per-layer α: the saved adapter (per-module scales folded into A) equals the merged save."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hf_glue import GlueConfig
    from hf_glue.config import DataConfig, ExpertsConfig, OutputConfig
    from hf_glue.pipeline import run_merge

    results = {}
    for save_as in ("merged", "adapter"):
        results[save_as] = run_merge(
            ExpertsConfig(experts=lora_experts["ids"], cpu=True), DataConfig(dataset=lora_experts["dataset"]),
            GlueConfig(steps=10, granularity="block"), OutputConfig(output_dir=str(tmp_path / save_as),
                                                                      save_as=save_as))
    groups = results["merged"].group_coefficients
    assert len(groups) >= 3 and groups == results["adapter"].group_coefficients
    # the search's held-out loss is the saved model's: no parameter was renamed away on the way
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert _held_out_loss(saved, lora_experts) == pytest.approx(results["merged"].eval["loss"], abs=1e-5)
    assert len({round(row[lora_experts["ids"][0]], 6) for row in groups.values()}) > 1  # α differs by layer
    batch = _batch(lora_experts)
    with torch.no_grad():
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"])
        adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**batch).logits
    torch.testing.assert_close(adapter, merged, rtol=0, atol=1e-5)

    # hf-glue blend re-applies the per-layer coefficients to the adapters, in either form
    proc = run_cli("blend", "--from-result", str(tmp_path / "adapter" / "merge_result.json"),
                   "--output-dir", str(tmp_path / "blended"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("blend", "--from-result", str(tmp_path / "merged" / "merge_result.json"), "--save-as", "adapter",
                   "--output-dir", str(tmp_path / "blended-adapter"))
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        blended = AutoModelForSequenceClassification.from_pretrained(tmp_path / "blended").eval()(**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"])
        blended_adapter = PeftModel.from_pretrained(base, tmp_path / "blended-adapter").eval()(**batch).logits
    torch.testing.assert_close(blended, merged, rtol=0, atol=1e-5)
    torch.testing.assert_close(blended_adapter, merged, rtol=0, atol=1e-5)
    blended_result = json.loads((tmp_path / "blended-adapter" / "merge_result.json").read_text())
    assert blended_result["group_coefficients"] == groups
    card = (tmp_path / "blended-adapter" / "README.md").read_text()  # the search's cost and metrics, not 0 passes
    assert "## Results on the held-out split" in card and "forward passes" in card and "the search that learned" in card
    assert blended_result["base_model"]["id"] == "org/lora-base"


def test_glue_finds_the_best_blend_of_adapters(lora_experts):
    """Mixture target (domains 0 and 1): GLUE's held-out loss is within 10 % of the best blend on a 0.1 grid of
    the simplex, on at least 4 of 5 seeds."""
    from hf_glue import GlueConfig
    from hf_glue.config import DataConfig, ExpertsConfig
    from hf_glue.pipeline import eval_batches, prepare, run_method

    config = GlueConfig()
    prep = prepare(ExpertsConfig(experts=lora_experts["ids"], cpu=True), DataConfig(dataset=lora_experts["dataset"]),
                   config)

    def held_out(alpha) -> float:
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(1, 3)
        return prep.objective.evaluate(alpha, eval_batches(prep, config))["loss"]

    grid = [(i / 10, j / 10, (10 - i - j) / 10) for i in range(11) for j in range(11 - i)]
    best = min(held_out(a) for a in grid)
    uniform = held_out([1 / 3] * 3)
    assert best < 0.8 * uniform  # the blend matters here
    found = [held_out(run_method(prep, GlueConfig(seed=seed)).alpha) for seed in range(5)]
    assert sum(loss <= 1.1 * best for loss in found) >= 4, (best, found)


@pytest.fixture(scope="session")
def bad_adapters(lora_experts, build_root) -> dict:
    """Adapters that must be refused next to org/lora-0."""
    from safetensors.torch import load_file, save_file

    from conftest import HUB_CACHE
    from hf_glue import testing

    def variant(name: str, edit) -> str:
        path = build_root / name
        shutil.copytree(lora_experts["paths"][1], path, dirs_exist_ok=True)
        edit(path)
        testing.publish_to_cache(path, f"org/{name}", HUB_CACHE)
        return f"org/{name}"

    def other_base(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "org/some-other-base"
        (path / "adapter_config.json").write_text(json.dumps(config))

    def wider(path: Path) -> None:  # factors of a model with hidden size 48, not 32
        state = load_file(path / "adapter_model.safetensors")
        state = {k: torch.zeros(v.shape[0], 48) if k.endswith("query.lora_A.weight") else v for k, v in state.items()}
        save_file(state, path / "adapter_model.safetensors")

    def pickled(path: Path) -> None:
        torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
        (path / "adapter_model.safetensors").unlink()

    return {
        "other_base": variant("lora-other-base", other_base),
        "wider": variant("lora-wider", wider),
        "unreadable": variant("lora-unreadable", lambda p: (p / "adapter_config.json").write_text("{not json")),
        "pickled": variant("lora-pickled", pickled),
    }


BAD = {
    "other_base": ([], ["org/lora-other-base", "different base models", "org/some-other-base"]),
    "wider": ([], ["org/lora-wider", "lora_A", "another base"]),
    "unreadable": ([], ["org/lora-unreadable", "adapter_config.json"]),
    "pickled": ([], ["org/lora-pickled", "--allow-pickle"]),
    "mixed": ([], ["org/lora-0", "org/expert-0", "full checkpoint"]),
    "save_as_full": (["--save-as", "adapter"], ["--save-as adapter", "LoRA"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapters_fail_early_and_clearly(case, lora_experts, bad_adapters, cls_experts, tmp_path):
    extra, needles = BAD[case]
    if case == "mixed":
        experts = ["org/lora-0", "org/expert-0"]
    elif case == "save_as_full":
        experts = ["org/expert-0", "org/expert-1"]
    else:
        experts = ["org/lora-0", bad_adapters[case]]
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", *experts, "--dataset", lora_experts["dataset"], "--output-dir", str(out),
                   *extra)
    assert_refused(proc, needles, out)
    assert "SPSA" not in proc.stderr


def test_pickled_adapter_loads_with_allow_pickle(lora_experts, bad_adapters):
    from hf_glue import ExpertsConfig, GlueConfig, merge_experts

    result = merge_experts(["org/lora-0", bad_adapters["pickled"]], lora_experts["dataset"],
                           GlueConfig(method="uniform"), experts_config=ExpertsConfig(allow_pickle=True, cpu=True))
    assert result.coefficients == {"org/lora-0": 0.5, bad_adapters["pickled"]: 0.5}


def test_finetune_continues_the_adapter_or_the_whole_model(lora_experts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hf_glue import GlueConfig
    from hf_glue.config import DataConfig, ExpertsConfig, FinetuneConfig, OutputConfig
    from hf_glue.pipeline import run_merge

    embeddings = "bert.embeddings.word_embeddings.weight"
    base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"]).state_dict()
    for mode, save_as in (("adapter", "adapter"), ("full", "merged")):
        out = tmp_path / mode
        result = run_merge(ExpertsConfig(experts=lora_experts["ids"], cpu=True),
                           DataConfig(dataset=lora_experts["dataset"]), GlueConfig(method="weights", weights=ALPHA),
                           OutputConfig(output_dir=str(out), save_as=save_as),
                           finetune_config=FinetuneConfig(finetune_epochs=1, finetune_mode=mode, learning_rate=1e-3))
        assert result.eval_after["loss"] != pytest.approx(result.eval_before["loss"], abs=1e-6)
        if mode == "adapter":
            # only the blended adapter (and its head) trained: the base's own weights are untouched in the model
            # that was fine-tuned, and the saved adapter holds the trained factors
            trained = {n: p for n, p in result.model.named_parameters()}
            assert not any(p.requires_grad for n, p in trained.items() if "lora_" not in n
                           and "modules_to_save" not in n)
            torch.testing.assert_close(trained[f"base_model.model.{embeddings}"], base[embeddings], rtol=0, atol=0)
            model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
                lora_experts["base"]), out).eval()
            with torch.no_grad():
                batch = _batch(lora_experts)
                torch.testing.assert_close(model(**batch).logits, result.model.eval()(**batch).logits,
                                           rtol=0, atol=1e-5)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(out)
            assert not torch.equal(model.state_dict()[embeddings], base[embeddings])
        assert json.loads((out / "merge_result.json").read_text())["config"]["finetune"]["finetune_mode"] == mode


def test_module_granularity_groups_adapters_by_module_type(lora_experts):
    """--granularity module: one α per module type across layers (lora-1 also adapts the dense layers)."""
    from hf_glue import GlueConfig
    from hf_glue.config import DataConfig, ExpertsConfig
    from hf_glue.pipeline import prepare

    prep = prepare(ExpertsConfig(experts=lora_experts["ids"], cpu=True), DataConfig(dataset=lora_experts["dataset"]),
                   GlueConfig(granularity="module"))
    assert set(prep.matrix.groups) == {"attention.self.query", "attention.self.value", "attention.output.dense",
                                       "intermediate.dense", "output.dense", "head"}
    auto = prepare(ExpertsConfig(experts=lora_experts["ids"], cpu=True), DataConfig(dataset=lora_experts["dataset"]),
                   GlueConfig(granularity="auto"))
    assert auto.matrix.groups == prep.matrix.groups  # auto refines adapters per module type
    # α of one module type moves only that type's branches: the blends differ exactly there
    alpha = torch.full((2, len(prep.matrix.groups), 3), 1 / 3, dtype=torch.float64)
    alpha[1, prep.matrix.groups.index("attention.self.query")] = torch.tensor([1.0, 0.0, 0.0])
    first, second = [{k: v.clone() for k, v in p.items()} for p in prep.matrix.blend(alpha)]
    differ = sorted(k for k in first if not torch.equal(first[k], second[k]))
    assert differ and all(".attention.self.query.lora_A." in k for k in differ)


def test_half_precision_adapters_blend(lora_experts, tmp_path):
    """Adapters saved in bfloat16 (common on the Hub) are held in PEFT's float32 and blend like the float32 ones."""
    from safetensors.torch import load_file, save_file

    from hf_glue import ExpertsConfig, GlueConfig, merge_experts

    folders = []
    for d, path in enumerate(lora_experts["paths"]):
        folder = tmp_path / f"bf16-{d}"
        shutil.copytree(path, folder)
        state = load_file(folder / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "adapter_model.safetensors")
        folders.append(str(folder))
    config = GlueConfig(method="weights", weights=ALPHA)
    half = merge_experts(folders, lora_experts["dataset"], config, experts_config=ExpertsConfig(cpu=True))
    full = merge_experts(lora_experts["ids"], lora_experts["dataset"], config, experts_config=ExpertsConfig(cpu=True))
    assert half.eval["loss"] == pytest.approx(full.eval["loss"], rel=2e-2)


def test_adapters_over_a_bfloat16_base_keep_its_dtype(lora_experts):
    """--dtype bfloat16 loads the base in bfloat16: the adapters' blended heads (modules_to_save) stay in the base's
    dtype, so the search runs (half-precision full experts blend in float32; a PEFT base runs in its own)."""
    from hf_glue import ExpertsConfig, GlueConfig, merge_experts

    result = merge_experts(lora_experts["ids"], lora_experts["dataset"], GlueConfig(steps=4),
                           experts_config=ExpertsConfig(cpu=True, dtype="bfloat16"))
    assert result.forward_passes > 0 and torch.isfinite(torch.tensor(result.eval["loss"]))


def test_box_without_task_vectors_is_refused():
    from hf_glue import GlueConfig
    from hf_glue.errors import GlueError

    with pytest.raises(GlueError, match="--combine"):
        GlueConfig(parametrization="box")


def test_rslora_and_embedding_adapters_blend_exactly(lora_experts, tmp_path):
    """rsLoRA scales (α/√r) and LoRA on an embedding: the merged save equals Σ α_k θ_k of the adapters each
    folded into the base by PEFT itself."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from hf_glue import ExpertsConfig, GlueConfig, merge_experts

    folders, folded = [], []
    for k, (rank, rslora) in enumerate(((2, True), (4, False))):
        torch.manual_seed(k)
        config = LoraConfig(r=rank, lora_alpha=8, use_rslora=rslora, init_lora_weights=False,
                            target_modules=["word_embeddings", "query"], modules_to_save=["classifier"])
        model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(lora_experts["base"]), config)
        folder = tmp_path / f"a{k}"
        model.save_pretrained(folder)
        folders.append(str(folder))
        base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"])
        folded.append(PeftModel.from_pretrained(base, folder).merge_and_unload().state_dict())
    alpha = [0.7, 0.3]
    result = merge_experts(folders, lora_experts["dataset"], GlueConfig(method="weights", weights=alpha),
                           experts_config=ExpertsConfig(cpu=True, base_model=str(lora_experts["base"])))
    merged = result.model.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.query.weight",
                 "classifier.weight"):
        expected = alpha[0] * folded[0][name] + alpha[1] * folded[1][name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)  # float32 rounding
        assert name == "classifier.weight" or not torch.allclose(folded[0][name], folded[1][name])


def test_combine_refuses_adapters(lora_experts, tmp_path):
    proc = run_cli("merge", "--experts", *lora_experts["ids"], "--dataset", lora_experts["dataset"],
                   "--combine", "ties", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode != 0 and "drop --combine" in proc.stderr


def test_two_processes_merge_lora_adapters_like_one(lora_experts, tmp_path):
    """The adapter engine under accelerate: 2 processes learn the α of 1 and save the same adapter."""
    common = ["merge", "--experts", *lora_experts["ids"], "--dataset", lora_experts["dataset"], "--steps", "10",
              "--seed", "1", "--save-as", "adapter"]
    a, b, _ = one_and_two_processes(common, tmp_path)
    assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], abs=1e-5)
    assert (tmp_path / "two" / "adapter_config.json").is_file()


def test_saved_adapter_skips_peft_base_lookup(lora_experts, tmp_path):
    """An adapter whose base is a cache-only repo id: PEFT's own save looks the base up on the Hub and warns "Could not
    find a config file" (offline); hf-glue's save does not (a blend never resizes the vocabulary)."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hf_glue.report.result import save_model

    base = AutoModelForSequenceClassification.from_pretrained(lora_experts["base"])
    model = PeftModel.from_pretrained(base, lora_experts["paths"][0])
    model.peft_config["default"].base_model_name_or_path = "org/lora-base"  # a repo id, as the adapters name it
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        save_model(model, tmp_path / "ours")
    assert any("Could not find a config file" in str(w.message) for w in plain)  # the check this avoids
    assert not any("Could not find a config file" in str(w.message) for w in ours)
    assert (tmp_path / "ours" / "adapter_model.safetensors").is_file()
