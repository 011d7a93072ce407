"""Task-vector processing: TIES trim and sign election, DARE drop and rescale, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from hf_glue.engine import task_vectors
from hf_glue.engine.task_vectors import COMBINE_METHODS, process_deltas, topk_count


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _reference_ties(deltas: torch.Tensor, density: float, weights: torch.Tensor) -> torch.Tensor:
    """mergekit's definition written naively (topk over each flattened expert), for tie-free inputs."""
    flat = deltas.reshape(deltas.shape[0], -1).clone()
    if density < 1:
        keep = max(1, int(density * flat.shape[1]))
        for row in flat:
            mask = torch.zeros_like(row, dtype=torch.bool)
            mask[row.abs().topk(keep).indices] = True
            row.mul_(mask)
    weighted = flat * weights[:, None]
    elected = (weighted.sum(0) >= 0).float() * 2 - 1
    return (flat * (weighted.sign() == elected)).reshape(deltas.shape)


@pytest.fixture(params=[False, True], ids=["one-chunk", "tiny-chunks"])
def chunked(request, monkeypatch):
    """Runs a test once as is and once with 3-element chunks, so every chunk loop crosses boundaries."""
    if request.param:
        monkeypatch.setattr(task_vectors, "_CHUNK", 3)
    return request.param


def test_method_names():
    assert COMBINE_METHODS == ("task-arithmetic", "ties", "dare", "dare-ties")


def test_task_arithmetic_is_identity():
    deltas = torch.randn(3, 4, 5)
    assert process_deltas(deltas, "task-arithmetic") is deltas
    assert process_deltas(deltas, "dare", density=1.0) is deltas


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [(5, 0.4, 2), (100, 0.29, 28), (10, 0.01, 1), (10, 0.05, 1), (7, 1.0, 7), (1, 0.5, 1), (3, 0.999, 2)],
)
def test_topk_count_follows_mergekit(numel, density, expected):
    # int() truncates the float product (0.29 * 100 = 28.999…) and k = 0 is raised to 1, as in mergekit.
    assert topk_count(numel, density) == expected


def test_ties_trim_keeps_the_largest_magnitudes(chunked):
    out = process_deltas(_t([1, -4, 2, -3, 0.5]), "ties", density=0.4, weights=torch.ones(1))
    assert out.tolist() == [[0, -4, 0, -3, 0]]


def test_ties_trim_keeps_at_least_one_entry(chunked):
    out = process_deltas(_t([0.1, -0.2, 0.3, 5, 0.4, 0.5, -0.6, 0.7, 0.8, 0.9]), "ties", 0.05, torch.ones(1))
    assert out.tolist() == [[0, 0, 0, 5, 0, 0, 0, 0, 0, 0]]


def test_ties_trim_breaks_ties_in_index_order(chunked):
    # k = 2 of three entries with |x| = 3: the first two by index are kept.
    out = process_deltas(_t([3, 1, -3, 3, 2, 3]), "ties", density=0.34, weights=torch.ones(1))
    assert out.tolist() == [[3, 0, -3, 0, 0, 0]]


def test_ties_trim_counts_per_expert_over_the_flattened_tensor(chunked):
    deltas = torch.tensor([[[1.0, 8.0], [-7.0, 2.0]], [[-9.0, 0.5], [0.25, 6.0]]])
    out = process_deltas(deltas, "ties", density=0.5, weights=torch.tensor([1.0, 0.1]))
    # Expert 0 keeps 8, -7; expert 1 keeps -9, 6. Elected: sign(-0.9)=-, +8 -> +, -7 -> -, 0.6 -> +.
    assert out.tolist() == [[[0, 8], [-7, 0]], [[-9, 0], [0, 6]]]


TAUS = _t([1, -2, 3, -1], [-2, 1, -1, 0], [1, 1, -4, 2])


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # sums [0, 0, -2, 1]: a sum of exactly 0 elects +.
        ([1.0, 1.0, 1.0], [[1, 0, 0, 0], [0, 1, -1, 0], [1, 1, -4, 2]]),
        # weighted sums [2, -2.5, 1.5, 0]: the weights, not the raw deltas, decide.
        ([2.0, 0.5, 1.0], [[1, -2, 3, 0], [0, 0, 0, 0], [1, 0, 0, 2]]),
        # a negative weight flips its expert's sign: sums [4, -2, 0, 1], masks compare sign(w_k τ_k).
        ([1.0, -1.0, 1.0], [[1, -2, 3, 0], [-2, 1, -1, 0], [1, 0, 0, 2]]),
        # a zero weight keeps nothing of its expert (sign(0) matches no elected sign): sums [2, -1, -1, 1].
        ([1.0, 0.0, 1.0], [[1, -2, 0, 0], [0, 0, 0, 0], [1, 0, -4, 2]]),
    ],
)
def test_ties_sign_election_uses_the_weights(weights, expected, chunked):
    out = process_deltas(TAUS, "ties", density=1.0, weights=torch.tensor(weights))
    assert out.tolist() == expected


def test_ties_elects_after_trimming(chunked):
    # Untrimmed, entry 2 sums to -1 + 0.2 < 0 and would drop expert 1's 0.2; trimmed, expert 0's -1 is gone.
    deltas = _t([10, 9, -1, 0.1], [-0.1, -3, 0.2, -0.1])
    out = process_deltas(deltas, "ties", density=0.5, weights=torch.ones(2))
    assert torch.equal(out, _t([10, 9, 0, 0], [0, 0, 0.2, 0]))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.29, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(7,), (13, 5), (40, 33)])
def test_ties_matches_the_naive_definition(shape, density, chunked):
    gen = torch.Generator().manual_seed(len(shape) * 100 + int(density * 100))
    deltas = torch.randn(4, *shape, generator=gen)
    weights = torch.tensor([0.7, 0.5, -0.3, 1.2])
    assert torch.equal(process_deltas(deltas, "ties", density, weights), _reference_ties(deltas, density, weights))


def test_ties_handles_zeros_and_extreme_magnitudes(chunked):
    deltas = _t([0, 0, 0, -1e-30, 3e38, 0], [0, -0.0, 2, 0, 0, 0])
    out = process_deltas(deltas, "ties", density=0.5, weights=torch.ones(2))
    # Expert 0 keeps 3e38, -1e-30 and one zero; expert 1 keeps 2 and two zeros.
    assert torch.equal(out, _t([0, 0, 0, -1e-30, 3e38, 0], [0, 0, 2, 0, 0, 0]))


def test_dare_drops_and_rescales(chunked):
    deltas = torch.randn(3, 50, 40, generator=torch.Generator().manual_seed(0))
    out = process_deltas(deltas, "dare", density=0.25, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert torch.equal(out[kept], deltas[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    # Each expert draws its own mask.
    assert not torch.equal(kept[0], kept[1])


def test_dare_keeps_the_expectation():
    tau = torch.randn(64, generator=torch.Generator().manual_seed(0))
    draws = 4000
    density = 0.3
    out = process_deltas(tau.expand(draws, 64).clone(), "dare", density, generator=torch.Generator().manual_seed(2))
    sigma = tau.abs() * math.sqrt((1 - density) / density / draws)
    assert ((out.mean(0) - tau).abs() <= 5 * sigma + 1e-6).all()


def test_dare_is_reproducible_with_a_seeded_generator(chunked):
    deltas = torch.randn(2, 30, 7)
    first = process_deltas(deltas, "dare", 0.5, generator=torch.Generator().manual_seed(5))
    again = process_deltas(deltas, "dare", 0.5, generator=torch.Generator().manual_seed(5))
    other = process_deltas(deltas, "dare", 0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dare_ties_is_dare_then_the_election(chunked):
    deltas = torch.randn(3, 20, 9, generator=torch.Generator().manual_seed(3))
    weights = torch.tensor([0.7, 0.5, 0.3])
    dropped = process_deltas(deltas, "dare", 0.6, generator=torch.Generator().manual_seed(4))
    both = process_deltas(deltas, "dare-ties", 0.6, weights, generator=torch.Generator().manual_seed(4))
    assert torch.equal(both, process_deltas(dropped, "ties", 1.0, weights))
    assert (both != 0).sum() < (dropped != 0).sum()


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5, float("nan")])
@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_density_is_validated(method, density):
    with pytest.raises(ValueError, match="density"):
        process_deltas(torch.ones(2, 3), method, density, torch.ones(2))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="method"):
        process_deltas(torch.ones(2, 3), "linear", 0.5, torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        process_deltas(torch.ones(2, 3), "ties", 0.5)
    with pytest.raises(ValueError, match="weights"):
        process_deltas(torch.ones(2, 3), "dare-ties", 0.5, torch.ones(3))
    with pytest.raises(ValueError, match="floating"):
        process_deltas(torch.ones(2, 3, dtype=torch.int64), "ties", 0.5, torch.ones(2))


def test_half_precision_is_processed_in_float32():
    deltas = torch.randn(3, 11, 6).bfloat16()
    weights = torch.tensor([0.7, 0.5, 0.3])
    out = process_deltas(deltas, "ties", 0.4, weights)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, process_deltas(deltas.float(), "ties", 0.4, weights).bfloat16())
    assert process_deltas(deltas.double(), "ties", 0.4, weights).dtype == torch.float64


def test_inplace_overwrites_only_when_asked():
    deltas = torch.randn(3, 8, 8)
    original = deltas.clone()
    out = process_deltas(deltas, "ties", 0.5, torch.ones(3))
    assert torch.equal(deltas, original) and out.data_ptr() != deltas.data_ptr()
    again = process_deltas(deltas, "ties", 0.5, torch.ones(3), inplace=True)
    assert again.data_ptr() == deltas.data_ptr() and torch.equal(again, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    deltas = torch.randn(3, 300, 77, generator=torch.Generator().manual_seed(0))
    deltas[0, :100] = 0.5  # ties at the threshold
    weights = torch.tensor([0.7, 0.5, 0.3])
    on_gpu = process_deltas(deltas.cuda(), "ties", 0.3, weights.cuda())
    assert torch.equal(on_gpu.cpu(), process_deltas(deltas, "ties", 0.3, weights))
    first = process_deltas(deltas.cuda(), "dare-ties", 0.3, weights, torch.Generator("cuda").manual_seed(1))
    again = process_deltas(deltas.cuda(), "dare-ties", 0.3, weights, torch.Generator("cuda").manual_seed(1))
    assert torch.equal(first, again)
