"""Memory strategies on one process: on-the-fly blending (experts on the device, in CPU memory or in their
files) gives the materialised blend's losses; the estimate and the automatic choice; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused, run_cli
from hf_glue.engine.memory import Layout
from hf_glue.errors import GlueError
from hf_glue.config import DataConfig, ExpertsConfig, GlueConfig
from hf_glue.pipeline import batch_iterator, eval_batches, prepare

KINDS = {"classifier": ("cls_experts", "ids", "org/target"), "causal-lm": ("lm_experts", "ids", "org/lm-target"),
         "vit": ("image_experts", "vit", "org/img-target"),
         "resnet": ("image_experts", "resnet", "org/img-target")}  # batch norm: blended buffers


def _losses(request, kind: str, granularity: str = "model", **strategy):
    fixture, key, dataset = KINDS[kind]
    ids = request.getfixturevalue(fixture)[key]
    glue = GlueConfig(batch_size=8, granularity=granularity, eval_batch_size=16)
    prep = prepare(ExpertsConfig(experts=ids, cpu=True, **strategy), DataConfig(dataset=dataset,
                   max_eval_samples=32), glue)
    g, k = prep.matrix.num_groups, prep.matrix.num_experts
    alphas = torch.rand(3, g, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alphas /= alphas.sum(-1, keepdim=True)
    batch = next(batch_iterator(prep, glue))
    losses = prep.objective.losses(alphas, batch)
    held_out = prep.objective.evaluate(alphas[0], eval_batches(prep, glue))
    return prep, losses, held_out


@pytest.mark.parametrize("kind", list(KINDS))
def test_on_the_fly_gives_the_materialized_losses(kind, request):
    ref_prep, ref, ref_eval = _losses(request, kind, blend="materialized")
    assert ref_prep.plan.strategy == "replicated"
    for strategy in ({"blend": "on-the-fly"}, {"offload": "cpu"}, {"offload": "disk"}):
        if kind == "vit" and strategy.get("offload") == "disk":
            # this ViT's checkpoint keys differ from its modules: read through transformers, not from its files
            with pytest.raises(GlueError, match="offload-disk strategy is not available.*read through transformers"):
                _losses(request, kind, **strategy)
            continue
        prep, losses, held_out = _losses(request, kind, **strategy)
        assert prep.plan.strategy == {"blend": "on-the-fly"}.get(next(iter(strategy)), "offload-" +
                                                                 strategy.get("offload", ""))
        assert torch.allclose(losses, ref, atol=1e-5, rtol=0), (strategy, losses, ref)
        for metric, value in ref_eval.items():
            assert held_out[metric] == pytest.approx(value, abs=1e-5)
        # the template never holds a blend between forward passes, and no product buffers exist
        assert all(p.is_meta for p in prep.model.parameters())
        assert prep.matrix.product_bytes() == 0
        # blends kept for reuse: at most one block and the root's tensors (tied ones once), as the estimate counts
        layout = Layout.of({n: (sl.shape, sl.dtype) for n, sl in prep.matrix.slots.items()})
        pooled = sum(t.nbytes for spare in prep.matrix._spare.values() for t in spare)
        assert 0 < pooled <= layout.block + layout.outside
    if kind != "vit":
        assert prep.matrix.expert_bytes() == 0  # disk: nothing held


def test_on_the_fly_task_vectors_give_the_materialized_losses(cls_experts):
    """--combine ties: the base is one more row, with coefficient 1 (the offset), on the fly too."""
    losses = {}
    for blend in ("materialized", "on-the-fly"):
        glue = GlueConfig(batch_size=8, combine="ties", granularity="block")
        prep = prepare(ExpertsConfig(experts=cls_experts["ids"], cpu=True, base_model="org/base", blend=blend),
                       DataConfig(dataset="org/target"), glue)
        g, k = prep.matrix.num_groups, prep.matrix.num_experts
        alphas = 1.5 * torch.rand(2, g, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        losses[blend] = prep.objective.losses(alphas, next(batch_iterator(prep, glue)))
    assert torch.allclose(losses["on-the-fly"], losses["materialized"], atol=1e-5, rtol=0)


def test_on_the_fly_per_block_coefficients(request):
    _, ref, _ = _losses(request, "causal-lm", "block", blend="materialized")
    _, losses, _ = _losses(request, "causal-lm", "block", blend="on-the-fly")
    assert torch.allclose(losses, ref, atol=1e-5, rtol=0)


#: meta-llama/Llama-2-7b-hf's config.json (no weights needed: the model is built on the meta device)
LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
            "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
            "vocab_size": 32000}
LLAMA_7B_PARAMETERS = 6_738_415_616  # as published


def _config_only_experts(tmp_path, config: dict, k: int = 4) -> list[str]:
    paths = []
    for i in range(k):
        (tmp_path / f"e{i}").mkdir()
        (tmp_path / f"e{i}" / "config.json").write_text(json.dumps(config))
        paths.append(str(tmp_path / f"e{i}"))
    return paths


def test_estimate_of_four_7b_experts_matches_the_arithmetic(tmp_path):
    """K = 4 Llama-7B experts in bfloat16 (N·b = 13.5 GB each) under --max-memory 80GiB: the replicated search,
    K·N·b + 2q float32 blends = 100 GiB, does not fit and is passed over for on-the-fly (K·N·b) on one GPU and for the
    sharded search ((K + 2q)·N·b / P at most) on 8."""
    from hf_glue.config import EstimateConfig
    from hf_glue.plan import estimate_merge

    ids = _config_only_experts(tmp_path, LLAMA_7B)
    experts = ExpertsConfig(experts=ids, dtype="bfloat16", max_memory="80GiB")
    one = estimate_merge(experts, EstimateConfig(device="cuda"))
    n, b, k, q = LLAMA_7B_PARAMETERS, 2, 4, 1
    assert one["parameters"] == n and one["source"] == "config" and one["expert_bytes"] == n * b
    s = one["strategies"]

    def near(got, want):
        return abs(got - want) <= 0.1 * want

    # the search's blends are float32 (b' = 4): 2q of them in the replicated search; on the fly one layer's
    assert near(s["replicated"]["total"], (k * b + 2 * q * 4) * n) and not s["replicated"]["fits"]
    assert k * n * b < s["on-the-fly"]["total"] <= 1.15 * k * n * b and s["on-the-fly"]["fits"]
    # offloaded: the device holds the K rows of one tensor (the largest: 32000 × 4096 embeddings) at a time
    assert s["offload-cpu"]["host"] == k * n * b and s["offload-cpu"]["experts"] == k * 32000 * 4096 * b
    assert s["offload-disk"]["total"] == s["offload-cpu"]["total"] < 0.15 * k * n * b
    assert s["on-the-fly"]["moved"] == s["offload-disk"]["moved"] == 2 * q * k * n * b  # every forward reads K
    assert "sharded" not in s and one["chosen"] == "on-the-fly"
    eight = estimate_merge(experts, EstimateConfig(device="cuda", num_processes=8))
    sharded = eight["strategies"]["sharded"]
    # K·N·b/P of experts, the model's own float32 shard (N·4/P) and the gathered float32 blocks
    assert sharded["experts"] == -(-k * n * b // 8) and sharded["total"] <= (k * b + 2 * 4) * n / 8 * 1.1
    assert sharded["moved"] == 2 * q * n * 4 * 7 // 8  # all-gathers: each process receives 7/8 of each model
    assert eight["chosen"] == "sharded"
    bigger = estimate_merge(ExpertsConfig(experts=ids, dtype="bfloat16", max_memory="200GiB"),
                            EstimateConfig(device="cuda"))
    assert bigger["chosen"] == "replicated"  # the fastest, where it fits


def test_estimate_of_lora_adapters_plans_the_base_and_the_adapters(lora_experts):
    from hf_glue import EstimateConfig, estimate_merge

    report = estimate_merge(ExpertsConfig(experts=lora_experts["ids"][:2]), EstimateConfig(device="cpu"))
    assert list(report["strategies"]) == ["lora"] and report["chosen"] == "lora"
    assert report["source"] == "headers"  # the base's safetensors are in the cache: their headers, not its config
    lora = report["strategies"]["lora"]
    assert lora["experts"] > report["expert_bytes"]  # the base once, plus the two adapters' factors


def test_estimate_command_prints_every_strategy_and_the_choice(tmp_path):
    ids = _config_only_experts(tmp_path, LLAMA_7B)
    proc = run_cli("estimate", "--experts", *ids, "--dtype", "bfloat16", "--max-memory", "80GiB", "--device", "cuda",
                   "--num-processes", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()}
    for name in ("replicated", "sharded", "on-the-fly", "offload-cpu", "offload-disk"):
        assert name in rows
    assert rows["replicated"].rstrip().endswith("no") and "6.74 B parameters" in proc.stdout
    assert "merge would use: sharded (--shard)" in proc.stdout
    assert not list(tmp_path.glob("e0/*.safetensors"))  # nothing downloaded or written


def test_merge_picks_on_the_fly_when_the_replicated_search_does_not_fit(cls_experts, tmp_path):
    """Under a budget between the two estimates, merge blends on the fly (and says so), with the materialised
    run's coefficients and weights."""
    from hf_glue.engine.memory import HEADROOM
    from hf_glue.io.experts import expert_from_repo, fetch_weights, resolve_repos
    from hf_glue.pipeline import memory_plans
    from hf_glue.tasks.base import fit_max_length

    ids = cls_experts["ids"]
    common = ["merge", "--experts", *ids, "--dataset", "org/target", "--steps", "6", "--spsa-samples", "2",
              "--batch-size", "16", "--cpu"]
    experts = [expert_from_repo(r) for r in resolve_repos(ids)]
    fetch_weights(experts)
    glue = GlueConfig(steps=6, spsa_samples=2, batch_size=16)
    data = fit_max_length(DataConfig(dataset="org/target"), experts[0].config)
    plans = memory_plans(experts, ExpertsConfig(experts=ids), data, glue, 1)
    low, high = plans["on-the-fly"].memory.total, plans["replicated"].memory.total
    budget = int((low + high) / 2 / HEADROOM)
    auto = run_cli(*common, "--max-memory", str(budget), "--output-dir", str(tmp_path / "auto"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "using the on-the-fly strategy" in auto.stderr
    whole = run_cli(*common, "--blend", "materialized", "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = json.loads((tmp_path / "auto" / "merge_result.json").read_text())
    b = json.loads((tmp_path / "whole" / "merge_result.json").read_text())
    assert a["details"]["memory"]["strategy"] == "on-the-fly" and b["details"]["memory"]["strategy"] == "replicated"
    # the two engines run the same blends through different kernels (one product per segment vs per tensor, views
    # vs hooks): the forward passes agree to float32 rounding, not bit for bit (the old code too, once a search
    # starts off a vertex), so the searches agree to that rounding
    assert a["details"]["selection"]["chosen"] == b["details"]["selection"]["chosen"]
    for name in a["coefficients"]:
        assert a["coefficients"][name] == pytest.approx(b["coefficients"][name], abs=1e-6)
    x, y = load_file(tmp_path / "auto" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)
    refused = run_cli(*common, "--blend", "materialized", "--max-memory", str(budget), "--output-dir",
                      str(tmp_path / "refused"))
    assert_refused(refused, ["needs about", "(replicated)", "--blend on-the-fly"], tmp_path / "refused")


REFUSALS = {
    "shard_one_process": (["--shard"], ["--shard splits the experts across processes", "torchrun"]),
    "offload_materialized": (["--offload", "disk", "--blend", "materialized"], ["--offload disk", "--blend on-the-fly"]),
    "shard_and_on_the_fly": (["--shard", "--blend", "on-the-fly"], ["pick one"]),
    "full_gradient_on_the_fly": (["--method", "full-gradient", "--blend", "on-the-fly"],
                                 ["on-the-fly strategy is not available", "full-gradient"]),
    "ties_from_disk": (["--combine", "ties", "--base-model", "org/base", "--offload", "disk"],
                       ["offload-disk strategy is not available", "--combine"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_strategy_flags_that_cannot_work_are_refused_before_loading(case, cls_experts, tmp_path):
    flags, needles = REFUSALS[case]
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--output-dir", str(out),
                   *flags)
    assert_refused(proc, needles, out)
    assert "SPSA" not in proc.stderr


def test_adapters_refuse_full_model_strategies(lora_experts, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("merge", "--experts", *lora_experts["ids"], "--dataset", lora_experts["dataset"], "--output-dir",
                   str(out), "--blend", "on-the-fly")
    assert_refused(proc, ["LoRA adapters blend as low-rank branches", "--blend on-the-fly"], out)


def _blend_both_ways(model_class, config, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random experts of ``model_class``: the logits of θ(0.3, 0.7) formed on the fly, and materialised."""
    from accelerate import init_empty_weights

    from hf_glue.engine.matrix import ExpertMatrix
    from hf_glue.engine.onthefly import OnTheFlyMatrix

    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v for k, v in model_class(config).eval().state_dict().items() if v.is_floating_point()})
    matrix = ExpertMatrix.from_rows(["a", "b"], states, ["model"], {n: 0 for n in states[0]})
    with init_empty_weights(include_buffers=False):
        template = model_class(config).eval()
    alpha = torch.tensor([[0.3, 0.7]])
    whole = dict(matrix.materialize(alpha))
    reference = model_class(config).eval()
    reference.load_state_dict(whole, strict=False)
    with torch.no_grad():
        expected = reference(**inputs).logits
        engine = OnTheFlyMatrix(matrix, template, torch.device("cpu"))
        armed = engine.models(alpha.unsqueeze(0))
        next(armed)  # the hooks hold θ(α) until the generator moves on
        got = template(**inputs).logits
        armed.close()
    return got, expected


def test_on_the_fly_serves_weights_read_outside_their_module():
    """DeBERTa-v2 reads its relative position embeddings' weight from every layer (not by calling the module):
    formed per block, with the tensors outside blocks kept for the whole forward, it runs and matches."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                             position_buckets=8, pos_att_type=["p2c", "c2p"], num_labels=3)
    inputs = {"input_ids": torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))}
    got, expected = _blend_both_ways(DebertaV2ForSequenceClassification, config, inputs)
    assert torch.allclose(got, expected, atol=1e-6)


def test_on_the_fly_encoder_decoder_with_shared_embeddings():
    """T5: embeddings shared by encoder, decoder and (tied) head; the relative attention bias lives in each stack's
    first block and is passed on to the others as a tensor."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, tie_word_embeddings=True, decoder_start_token_id=0)
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 40, (2, 7), generator=gen),
              "decoder_input_ids": torch.randint(0, 40, (2, 5), generator=gen)}
    got, expected = _blend_both_ways(T5ForConditionalGeneration, config, inputs)
    assert torch.allclose(got, expected, atol=1e-5)


def test_blend_command_refuses_search_strategy_flags(cls_experts, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("blend", "--experts", *cls_experts["ids"][:2], "--weights", "0.5", "0.5", "--offload", "disk",
                   "--output-dir", str(out))
    assert_refused(proc, ["--offload", "streams them tensor by tensor"], out)
