"""The SPSA optimiser on its own: projection, perturbations, gains, convergence, determinism."""

from __future__ import annotations

import pytest
import torch

from hf_glue.optim.spsa import SPSA, project_simplex


def test_projection_lands_on_simplex_and_is_idempotent():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(50, 4, generator=gen, dtype=torch.float64) * 3
    p = project_simplex(v)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(project_simplex(p), p)
    # it is the closest simplex point: no random simplex point is nearer
    for row, proj in zip(v, p):
        others = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((200,))
        assert ((others - row) ** 2).sum(-1).min() >= ((proj - row) ** 2).sum() - 1e-12


def test_projection_known_values():
    torch.testing.assert_close(project_simplex(torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)),
                               torch.full((1, 3), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(project_simplex(torch.tensor([[2.0, 0.0]], dtype=torch.float64)),
                               torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def _quadratic(target: torch.Tensor):
    """Loss(α) = ||α − target||² for a batch of coefficient sets."""
    return lambda alphas: ((alphas - target) ** 2).sum(dim=(1, 2))


@pytest.mark.parametrize("parametrization", ["simplex", "softmax"])
def test_converges_on_a_quadratic(parametrization):
    target = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    spsa = SPSA(torch.full((1, 3), 1 / 3, dtype=torch.float64), parametrization, A=10, seed=0,
                c=0.05 if parametrization == "simplex" else 0.1)
    spsa.calibrate(_quadratic(target), first_move=0.1 if parametrization == "simplex" else 0.5)
    for _ in range(300):
        spsa.step(_quadratic(target))
    torch.testing.assert_close(spsa.alpha, target, atol=0.05, rtol=0)
    torch.testing.assert_close(spsa.alpha.sum(-1), torch.ones(1, dtype=torch.float64))


def test_perturbations_are_seeded_rademacher_and_centred():
    spsa = SPSA(torch.full((2, 4), 0.25, dtype=torch.float64), "simplex", a=1.0, seed=3)
    d1, d2 = spsa.perturbation(5), spsa.perturbation(5)
    assert torch.equal(d1, d2)
    torch.testing.assert_close(d1.sum(-1), torch.zeros(2, dtype=torch.float64))
    assert bool((d1.abs().sum(-1) > 0).all())
    raw = SPSA(torch.full((2, 4), 0.25, dtype=torch.float64), "softmax", a=1.0, seed=3).perturbation(5)
    assert set(raw.flatten().tolist()) <= {-1.0, 1.0}
    assert not torch.equal(spsa.perturbation(6), d1)
    other_seed = SPSA(torch.full((2, 4), 0.25, dtype=torch.float64), "simplex", a=1.0, seed=4)
    assert any(not torch.equal(other_seed.perturbation(t), spsa.perturbation(t)) for t in range(5))


def test_two_expert_perturbations_are_never_zero():
    spsa = SPSA(torch.full((1, 2), 0.5, dtype=torch.float64), "simplex", a=1.0)
    for t in range(50):
        assert spsa.perturbation(t).abs().sum() > 0


def test_gain_sequences_follow_the_specification():
    spsa = SPSA(torch.full((1, 2), 0.5, dtype=torch.float64), "softmax", c=0.1, gamma=0.101, a=2.0, A=10)
    for t in (0, 1, 7, 99):
        assert spsa.c_t(t) == pytest.approx(0.1 / (t + 1) ** 0.101)
        assert spsa.a_t(t) == pytest.approx(2.0 / (t + 1 + 10) ** 0.602)


def test_step_uses_one_call_for_both_evaluations_and_the_spsa_formula():
    calls = []

    def loss(alphas):
        calls.append(alphas.clone())
        return alphas[:, 0, 0] * 2.0  # linear: L(α) = 2 α_0

    spsa = SPSA(torch.full((1, 2), 0.5, dtype=torch.float64), "softmax", c=0.1, a=1.0, A=0)
    x0 = spsa.x.clone()
    delta = spsa.perturbation(0)
    rec = spsa.step(loss)
    assert len(calls) == 1 and calls[0].shape == (2, 1, 2)  # L+ and L- evaluated together (same batch)
    lp, lm = 2 * torch.softmax(x0 + 0.1 * delta, -1)[0, 0], 2 * torch.softmax(x0 - 0.1 * delta, -1)[0, 0]
    assert rec.loss_plus == pytest.approx(float(lp)) and rec.loss_minus == pytest.approx(float(lm))
    expected = x0 - 1.0 / 1 ** 0.602 * (lp - lm) / (2 * 0.1) * delta
    torch.testing.assert_close(spsa.x, expected)


def test_calibration_sets_first_move():
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    spsa = SPSA(torch.full((1, 2), 0.5, dtype=torch.float64), "simplex", A=5, seed=0)
    spsa.calibrate(_quadratic(target), first_move=0.1, probes=4)
    before = spsa.x.clone()
    spsa.step(_quadratic(target))
    assert 0.03 < float((spsa.x - before).abs().mean()) < 0.3


def test_same_seed_same_trajectory():
    # K = 3: with two experts ĝ does not depend on Δ's sign, so seeds could not be told apart
    target = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)

    def run(seed):
        spsa = SPSA(torch.full((1, 3), 1 / 3, dtype=torch.float64), "simplex", a=0.05, seed=seed)
        return [spsa.step(_quadratic(target)).alpha for _ in range(5)]

    assert all(torch.equal(a, b) for a, b in zip(run(0), run(0)))
    assert not all(torch.equal(a, b) for a, b in zip(run(0), run(1)))
