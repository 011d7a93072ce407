"""The blending engine: products equal Σ α_k θ_k, views share storage, groups partition the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_glue.engine.matrix import ExpertMatrix, group_of
from hf_glue.io.experts import Expert, _index_files
from hf_glue.io.hub import ResolvedRepo

NAMES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.mlp.weight": (4, 4),
    "model.layers.1.mlp.weight": (4, 4),
    "model.layers.10.mlp.weight": (4,),
    "lm_head.weight": (10, 4),
    "position_ids": (1, 8),
}


def _experts(tmp_path: Path, k: int, dtype: torch.dtype) -> list[Expert]:
    experts = []
    for i in range(k):
        gen = torch.Generator().manual_seed(i)
        tensors = {n: torch.randn(s, generator=gen).to(dtype) for n, s in NAMES.items() if n != "position_ids"}
        tensors["position_ids"] = torch.arange(8).reshape(1, 8) + i  # non-float: taken from expert 0
        folder = tmp_path / f"e{i}"
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors")
        repo = ResolvedRepo(str(folder), str(folder), None, folder)
        experts.append(Expert(repo, {}, _index_files([folder / "model.safetensors"], str(folder))))
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["model", "block", "tensor"])
def test_blend_is_the_convex_combination(tmp_path, dtype, granularity):
    experts = _experts(tmp_path, 3, dtype)
    matrix = ExpertMatrix.from_experts(experts, granularity)
    gen = torch.Generator().manual_seed(0)
    alphas = torch.softmax(torch.randn(2, matrix.num_groups, 3, generator=gen), -1)
    blends = matrix.blend(alphas)
    raw = [dict(e.iter_tensors()) for e in experts]
    for m in range(2):
        for name in NAMES:
            if name == "position_ids":
                assert torch.equal(blends[m][name], raw[0][name])
                continue
            g = matrix.slots[name].group
            expected = sum(alphas[m, g, k].double() * raw[k][name].double() for k in range(3))
            assert blends[m][name].dtype == dtype and blends[m][name].shape == raw[0][name].shape
            tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2 ** -8}
            torch.testing.assert_close(blends[m][name].double(), expected, **tol)


def test_blends_are_views_of_one_product(tmp_path):
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 2, torch.float32), "model")
    blends = matrix.blend(torch.full((2, 1, 2), 0.5))
    a, b = blends[0]["model.layers.0.mlp.weight"], blends[1]["model.layers.0.mlp.weight"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # both perturbed models, one buffer


def test_blend_is_differentiable(tmp_path):
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 2, torch.float32), "model")
    alpha = torch.tensor([[[0.3, 0.7]]], requires_grad=True)
    loss = matrix.blend(alpha)[0]["lm_head.weight"].sum()
    loss.backward()
    assert alpha.grad is not None and alpha.grad.shape == (1, 1, 2)


def test_groups():
    assert group_of("bert.encoder.layer.3.attention.self.query.weight", "block") == "bert.encoder.layer.3"
    assert group_of("transformer.h.0.attn.c_attn.weight", "block") == "transformer.h.0"
    assert group_of("bert.embeddings.word_embeddings.weight", "block") == "embeddings"
    assert group_of("classifier.weight", "block") == "head"
    assert group_of("classifier.weight", "model") == "model"
    assert group_of("classifier.weight", "tensor") == "classifier.weight"


def test_group_order_and_summary(tmp_path):
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 2, torch.float32), "block")
    assert matrix.groups == ["embeddings", "model.layers.0", "model.layers.1", "model.layers.10", "head"]
    alpha = torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * 4, dtype=torch.float64)
    sizes = matrix.group_sizes()
    summary = matrix.summarize(alpha)
    assert list(summary.values())[0] == pytest.approx(float(sizes[0] / sizes.sum()))
