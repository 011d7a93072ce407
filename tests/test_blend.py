"""The blending engine: products equal Σ α_k θ_k, views share storage, groups partition the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from hf_glue.engine.matrix import CPU_CHUNK, ExpertMatrix, group_of
from hf_glue.io.experts import Expert, _index_files
from hf_glue.io.hub import ResolvedRepo

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
NAMES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.mlp.weight": (4, 4),
    "model.layers.1.mlp.weight": (4, 4),
    "model.layers.10.mlp.weight": (4,),
    "lm_head.weight": (10, 4),
    "position_ids": (1, 8),
}


def _experts(tmp_path: Path, k: int, dtype: torch.dtype, names: dict = NAMES) -> list[Expert]:
    experts = []
    for i in range(k):
        gen = torch.Generator().manual_seed(i)
        tensors = {n: torch.randn(s, generator=gen).to(dtype) for n, s in names.items() if n != "position_ids"}
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
            # the search's blends are float32 for half experts (exact until the saved model is rounded)
            assert blends[m][name].dtype == torch.float32 and blends[m][name].shape == raw[0][name].shape
            torch.testing.assert_close(blends[m][name].double(), expected, atol=1e-6, rtol=1e-5)


def test_blends_are_views_of_one_product(tmp_path):
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 2, torch.float32), "model")
    blends = matrix.blend(torch.full((2, 1, 2), 0.5))
    a, b = blends[0]["model.layers.0.mlp.weight"], blends[1]["model.layers.0.mlp.weight"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # both perturbed models, one buffer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blend_gradient_is_the_analytic_one(tmp_path, dtype, device):
    """loss = Σ_m Σ_i w_mi θ(α_m)_i  ⇒  ∂loss/∂α_mgk = Σ_{i in group g} w_mi θ_k,i (w exact in bfloat16)."""
    experts = _experts(tmp_path, 3, dtype)
    matrix = ExpertMatrix.from_experts(experts, "block", device=device)
    gen = torch.Generator().manual_seed(1)
    alpha = torch.softmax(torch.randn(2, matrix.num_groups, 3, generator=gen), -1).requires_grad_(True)
    raw = [dict(e.iter_tensors()) for e in experts]
    weights = [{n: torch.randn(s, generator=gen).to(torch.bfloat16).float() for n, s in NAMES.items()
                if n != "position_ids"} for _ in range(2)]
    blends = matrix.blend(alpha)
    loss = sum((blends[m][n].float().cpu() * w).sum() for m in range(2) for n, w in weights[m].items())
    loss.backward()
    expected = torch.zeros(2, matrix.num_groups, 3, dtype=torch.float64)
    for m in range(2):
        for n, w in weights[m].items():
            for k in range(3):
                expected[m, matrix.slots[n].group, k] += (w.double() * raw[k][n].double()).sum()
    torch.testing.assert_close(alpha.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_differentiable_half_blend_keeps_no_float32_copy(tmp_path):
    """Autograd saves the expert matrix itself, not float32 copies of its chunks (2 × its size in bfloat16)."""
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 2, torch.bfloat16), "model")
    expert_storage = matrix.buffers[torch.bfloat16].untyped_storage().data_ptr()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    alpha = torch.tensor([[[0.3, 0.7]]], requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blend = matrix.blend(alpha)[0]
    assert saved and all(ptr == expert_storage for ptr, _ in saved)
    sum(blend[n].float().sum() for n in NAMES if n != "position_ids").backward()
    assert alpha.grad.abs().sum() > 0


def test_one_product_buffer_serves_every_number_of_models(tmp_path):
    """An M = 1 blend after an M = 2 one is the first row of the same buffer: 2·N·b held, not 3·N·b."""
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 3, torch.float32), "block")
    n_bytes = matrix.buffers[torch.float32].shape[1] * 4
    two = matrix.blend(torch.full((2, matrix.num_groups, 3), 1 / 3))
    first = two[0]["lm_head.weight"].data_ptr()
    one = matrix.blend(torch.full((1, matrix.num_groups, 3), 1 / 3))
    assert matrix.product_bytes() == 2 * n_bytes
    assert one[0]["lm_head.weight"].data_ptr() == first
    matrix.blend(torch.full((3, matrix.num_groups, 3), 1 / 3))  # grows: the smaller buffers are freed
    assert matrix.product_bytes() == 3 * n_bytes
    matrix.release()
    assert matrix.product_bytes() == 0


def test_views_are_built_once(tmp_path):
    """Repeated blends reuse the per-tensor view dicts: the same tensor objects, holding the new values."""
    experts = _experts(tmp_path, 2, torch.float32)
    matrix = ExpertMatrix.from_experts(experts, "model")
    first = matrix.blend(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    views = {n: first[1][n] for n in NAMES}
    second = matrix.blend(torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]))
    assert all(second[1][n] is views[n] for n in NAMES)
    torch.testing.assert_close(second[1]["lm_head.weight"], dict(experts[0].iter_tensors())["lm_head.weight"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_half_blend_is_exact_until_saved(tmp_path, dtype, unit, device):
    """Half-precision experts: the search's blends are float32 with α and the accumulation in float32 (float32
    rounding of the float64 value); `materialize` rounds θ(α) once to the experts' dtype."""
    experts = _experts(tmp_path, 3, dtype)
    matrix = ExpertMatrix.from_experts(experts, "block", device=device)
    gen = torch.Generator().manual_seed(2)
    alphas = torch.softmax(torch.randn(2, matrix.num_groups, 3, generator=gen), -1)
    raw = [dict(e.iter_tensors()) for e in experts]
    blends = matrix.blend(alphas)
    saved = matrix.materialize(alphas[0])
    for m in range(2):
        for name in NAMES:
            if name == "position_ids":
                continue
            a = alphas[m, matrix.slots[name].group].double()
            terms = torch.stack([a[k] * raw[k][name].double() for k in range(3)])
            ref, scale = terms.sum(0), terms.abs().sum(0)
            blend = blends[m][name].cpu()
            assert blend.dtype == torch.float32
            assert bool(((blend.double() - ref).abs() <= 2 ** -22 * scale + 1e-12).all()), name
            if m == 0:
                assert saved[name].dtype == dtype
                assert bool(((saved[name].cpu().double() - ref).abs() <= unit * ref.abs() + 1e-6 * scale).all())


def _fine_tunes(dtype: torch.dtype, share: float, k: int = 3, n: int = 200_000) -> list[dict[str, torch.Tensor]]:
    """``k`` half-precision checkpoints of one base whose task vectors are ``share`` of |θ| (as fine-tunes are)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen) * 0.05
    norm = base.norm()
    out = []
    for _ in range(k):
        tau = torch.randn(n, generator=gen)
        out.append({"w": (base + share * norm * tau / tau.norm()).to(dtype)})
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine", ["replicated", "on-the-fly"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("share", [1e-3, 1e-2])
def test_half_precision_perturbation_is_the_intended_one(engine, dtype, share, device):
    """Task vectors 0.1–1 % of |θ|, SPSA's perturbation c·Δ: the two blends the search runs differ by the exact
    Σ (α₊ − α₋)_k θ_k (cosine ≥ 0.99), and Σα = 1 blends K copies of one expert back to that expert exactly (α is
    not rounded to the experts' dtype, which would rescale the whole model by up to 2^-8)."""
    from hf_glue.engine.onthefly import OnTheFlyMatrix
    from hf_glue.optim.spsa import SPSA

    rows = _fine_tunes(dtype, share)
    matrix = ExpertMatrix.from_rows(["a", "b", "c"], rows, ["model"], {"w": 0}, device=device)
    spsa = SPSA(torch.full((1, 3), 1 / 3), "simplex", c=0.05)
    d = spsa.perturbation(0)
    alphas = torch.stack([spsa.alpha + 0.05 * d, spsa.alpha - 0.05 * d]).float()

    class Probe(torch.nn.Module):  # a template whose forward returns the weight the engine put in it
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(len(rows[0]["w"]), device="meta"))

        def forward(self) -> torch.Tensor:
            return self.w.detach().clone()

    def blends(m: ExpertMatrix, a: torch.Tensor) -> list[torch.Tensor]:
        if engine == "replicated":
            return [b["w"].double().cpu() for b in m.blend(a)]
        probe = Probe()
        return [probe().double().cpu() for _ in OnTheFlyMatrix(m, probe, torch.device(device)).models(a)]

    plus, minus = blends(matrix, alphas)
    e = torch.stack([r["w"].double() for r in rows])
    exact = ((alphas[0] - alphas[1]).double() @ e)[0]
    cosine = torch.nn.functional.cosine_similarity(plus - minus, exact, dim=0)
    assert cosine >= 0.99, float(cosine)
    copies = ExpertMatrix.from_rows(["a", "b", "c"], [rows[0]] * 3, ["model"], {"w": 0}, device=device)
    same = blends(copies, torch.tensor([[[0.2, 0.3, 0.5]], [[1 / 3, 1 / 3, 1 / 3]]]))
    for blend in same:
        torch.testing.assert_close(blend, rows[0]["w"].double(), rtol=2 ** -22, atol=0)


class _NewStorage(TorchDispatchMode):
    """Records the bytes of every new storage an op allocates (not views, not ``out=`` or in-place results)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def test_half_blend_temporaries_stay_cache_sized(tmp_path):
    """bfloat16 on CPU: float32 work in chunks of ``CPU_CHUNK`` columns, whatever N, so a step moves little more
    than the floor's bytes (read K·N half, write M·N float32), not a float32 copy of the experts."""
    names = {"a.weight": (512, 512), "b.weight": (300, 100)}
    matrix = ExpertMatrix.from_experts(_experts(tmp_path, 3, torch.bfloat16, names), "model")
    n = matrix.buffers[torch.bfloat16].shape[1]
    assert n > 4 * CPU_CHUNK
    alphas = torch.full((2, 1, 3), 1 / 3)
    matrix.blend(alphas)  # allocates the kept product buffer
    with _NewStorage() as record:
        matrix.blend(alphas)
    assert sum(record.sizes) <= (3 + 2) * CPU_CHUNK * 4


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
