"""Memory strategies on one process: on-the-fly blending (experts on the device, in CPU memory or in their
files) gives the materialised blend's losses; the estimate and the automatic choice; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused, run_cli
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
    if kind != "vit":
        assert prep.matrix.expert_bytes() == 0  # disk: nothing held


def test_on_the_fly_per_block_coefficients(request):
    _, ref, _ = _losses(request, "causal-lm", "block", blend="materialized")
    _, losses, _ = _losses(request, "causal-lm", "block", blend="on-the-fly")
    assert torch.allclose(losses, ref, atol=1e-5, rtol=0)
