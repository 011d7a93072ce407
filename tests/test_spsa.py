"""The SPSA optimiser on its own: projection, perturbations, gains, convergence, determinism."""

from __future__ import annotations

import copy

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


def test_projection_of_huge_coordinates_stays_on_the_simplex():
    """NGOpt proposed coordinates near 1e16 on a text run: the projection summed to 2 (a model twice the size of
    two experts, saved as its answer). Rows far from the simplex still land on it, and on the right point."""
    rows = torch.tensor([[0.0, 1e16, 3.0, 1e16 + 2], [0.0, 1e17, 0.0, 1e17], [-5.0, 1e300, 2.0, 3.0],
                         [1e12, 1e12 + 0.5, -1e12, 1e12 - 0.5]], dtype=torch.float64)
    p = project_simplex(rows)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(p, torch.tensor([[0, 0, 0, 1], [0, 0.5, 0, 0.5], [0, 1, 0, 0], [0.25, 0.75, 0, 0]],
                                               dtype=torch.float64))


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
    raw = SPSA(torch.full((2, 4), 0.25, dtype=torch.float64), "softmax", a=1.0, seed=3).perturbation(5)
    assert set(raw.flatten().tolist()) <= {-1.0, 1.0}
    assert not torch.equal(spsa.perturbation(6), d1)
    other_seed = SPSA(torch.full((2, 4), 0.25, dtype=torch.float64), "simplex", a=1.0, seed=4)
    assert any(not torch.equal(other_seed.perturbation(t), spsa.perturbation(t)) for t in range(5))


@pytest.mark.timeout(60)  # a hang guard: redrawing the whole Δ until all rows are non-zero never ends here
@pytest.mark.parametrize("groups, experts", [(300, 2), (400, 3), (34, 2)])
def test_many_groups_draw_quickly_and_every_row_moves(groups, experts):
    spsa = SPSA(torch.full((groups, experts), 1 / experts, dtype=torch.float64), "simplex", a=1.0, seed=0)
    for t in range(20):
        d = spsa.perturbation(t)
        assert bool((d.abs().sum(-1) > 0).all())  # no group left without a direction
        torch.testing.assert_close(d.sum(-1), torch.zeros(groups, dtype=torch.float64))


def test_centred_directions_are_unbiased_for_the_projected_gradient():
    """E[d dᵀ] = s_K (I − 11ᵀ/K) with one s_K = 2^(K−1)/(2^(K−1) − 1) for every group (so ĝ estimates the same
    multiple of the gradient's in-plane component everywhere), and rows of different groups are uncorrelated:
    redrawing only zero rows must not bias, rescale or couple them."""
    for k, groups, n in ((3, 300, 600), (2, 300, 600)):
        spsa = SPSA(torch.full((groups, k), 1 / k, dtype=torch.float64), "simplex", a=1.0, seed=1)
        draws = torch.stack([spsa.perturbation(t) for t in range(n)])  # [n, G, K]
        second = torch.einsum("ngi,ngj->ij", draws, draws) / (n * groups)  # pooled over groups
        s_k = 2 ** (k - 1) / (2 ** (k - 1) - 1)
        torch.testing.assert_close(second, s_k * (torch.eye(k, dtype=torch.float64) - 1 / k), atol=0.02, rtol=0)
        per_group = torch.einsum("ngi,ngi->g", draws, draws) / n / (k - 1)  # trace / trace(I − 11ᵀ/K)
        assert float((per_group - s_k).abs().max()) < 0.25 * s_k  # no group singled out
        cross = torch.einsum("ni,nj->ij", draws[:, 0], draws[:, 1]) / n
        assert float(cross.abs().max()) < 0.2
    # every non-constant sign pattern of a row is equally likely (6 of them for K = 3)
    spsa = SPSA(torch.full((4, 3), 1 / 3, dtype=torch.float64), "simplex", a=1.0, seed=1)
    rows = torch.stack([spsa.perturbation(t)[0] for t in range(3000)])
    counts = torch.unique(torch.sign(rows), dim=0, return_counts=True)[1]
    assert len(counts) == 6 and float(counts.min()) > 0.8 * 3000 / 6


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


def _sample_losses(alphas: torch.Tensor) -> torch.Tensor:
    """A quadratic with a K = 3 optimum, evaluated on a batch of coefficient sets."""
    return ((alphas - torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)) ** 2).sum(dim=(1, 2))


def test_samples_spread_over_processes_equal_one_process_with_all_samples():
    """Perturbation-parallel: P processes with q samples each, losses gathered, take exactly the step of one
    process with P·q samples (the same Δs, the same average); here P = 2 is simulated in one process."""
    alpha0 = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    single = SPSA(alpha0, "simplex", a=0.5, samples=4, seed=7)
    ranks = [SPSA(alpha0, "simplex", a=0.5, samples=2, sample_offset=2 * p, seed=7) for p in range(2)]

    def gather_for(rank: int, frozen: list):
        def gather(local: torch.Tensor) -> torch.Tensor:
            # what the other rank computed on its own samples this step (its state before the step)
            other = frozen[1 - rank]
            c = other.c_t(other.t)
            alphas = []
            for i in range(other.sample_offset, other.sample_offset + other.samples):
                d = other.perturbation(other.t, i)
                alphas += [other.param.alpha(other.x + c * d), other.param.alpha(other.x - c * d)]
            theirs = _sample_losses(torch.stack(alphas))
            return torch.cat([local, theirs] if rank == 0 else [theirs, local])
        return gather

    for _ in range(5):
        expected = single.step(_sample_losses)
        frozen = [copy.deepcopy(r) for r in ranks]
        records = [ranks[p].step(_sample_losses, gather=gather_for(p, frozen)) for p in range(2)]
        for rec in records:
            torch.testing.assert_close(rec.alpha, expected.alpha, atol=1e-12, rtol=0)
            assert rec.loss_plus == pytest.approx(expected.loss_plus, abs=1e-12)


def test_non_finite_losses_reject_the_step_then_stop_naming_it():
    from hf_glue.optim.spsa import NonFiniteLoss

    calls = {"n": 0}

    def sometimes_nan(alphas):
        calls["n"] += 1
        losses = _sample_losses(alphas)
        return losses * float("nan") if calls["n"] == 3 else losses

    spsa = SPSA(torch.full((1, 3), 1 / 3, dtype=torch.float64), "simplex", a=0.5, seed=0)
    spsa.step(sometimes_nan)
    spsa.step(sometimes_nan)
    x, a, c = spsa.x.clone(), spsa.a, spsa.c_t(3)
    rec = spsa.step(sometimes_nan)  # the non-finite one
    assert rec.rejected and torch.equal(spsa.x, x) and spsa.a == a / 2
    assert spsa.c_t(3) == pytest.approx(c / 2)  # the next evaluations stay nearer the last good α
    assert not spsa.step(sometimes_nan).rejected and not torch.equal(spsa.x, x)  # and it goes on
    with pytest.raises(NonFiniteLoss, match=r"step 8"):
        for _ in range(10):
            spsa.step(lambda alphas: _sample_losses(alphas) * float("inf") - float("inf"))
    assert bool(torch.isfinite(spsa.x).all())
    with pytest.raises(NonFiniteLoss, match="starting blend"):
        SPSA(torch.full((1, 3), 1 / 3, dtype=torch.float64), "simplex").calibrate(
            lambda alphas: _sample_losses(alphas) * float("nan"), first_move=0.1)


def test_state_dict_continues_the_same_trajectory():
    alpha0 = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    straight = SPSA(alpha0, "simplex", A=5, seed=2)
    straight.calibrate(_sample_losses_groups, first_move=0.1)
    for _ in range(4):
        straight.step(_sample_losses_groups)
    import json

    saved = json.loads(json.dumps(straight.state_dict()))  # through JSON, as the checkpoint stores it
    for _ in range(6):
        straight.step(_sample_losses_groups)
    resumed = SPSA(alpha0, "simplex", A=5, seed=2)
    resumed.load_state_dict(saved)
    for _ in range(6):
        resumed.step(_sample_losses_groups)
    assert torch.equal(resumed.x, straight.x) and resumed.t == straight.t == 10


def _sample_losses_groups(alphas: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    return ((alphas - target) ** 2).sum(dim=(1, 2))


def test_averaging_returns_the_mean_of_the_last_iterates():
    """Polyak–Ruppert: ``result`` is the mean α after the updates of steps ``average_from`` …; before them, α."""
    spsa = SPSA(torch.full((1, 3), 1 / 3, dtype=torch.float64), "simplex", a=0.05, seed=0, average_from=3)
    alphas = []
    for t in range(6):
        alphas.append(spsa.step(_sample_losses).alpha)
        if t < 3:
            assert torch.equal(spsa.result, spsa.alpha)
    torch.testing.assert_close(spsa.result, torch.stack(alphas[3:]).mean(0))
    assert spsa.averaged_steps == 3
    torch.testing.assert_close(spsa.result.sum(-1), torch.ones(1, dtype=torch.float64))  # still on the simplex


def test_state_dict_continues_the_same_average():
    """A resumed optimiser ends at exactly the same averaged α (the running sum is saved and restored)."""
    import json

    alpha0 = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    straight = SPSA(alpha0, "simplex", A=5, seed=2, average_from=3)
    straight.calibrate(_sample_losses_groups, first_move=0.1)
    for _ in range(5):
        straight.step(_sample_losses_groups)
    saved = json.loads(json.dumps(straight.state_dict()))
    for _ in range(5):
        straight.step(_sample_losses_groups)
    resumed = SPSA(alpha0, "simplex", A=5, seed=2, average_from=3)
    resumed.load_state_dict(saved)
    for _ in range(5):
        resumed.step(_sample_losses_groups)
    assert torch.equal(resumed.result, straight.result) and resumed.averaged_steps == straight.averaged_steps == 7


def test_vertices_and_midpoints():
    from hf_glue.optim.spsa import midpoints, vertices

    v = vertices(2, 3)
    assert v.shape == (3, 2, 3) and torch.equal(v[1], torch.tensor([[0.0, 1.0, 0.0]] * 2, dtype=torch.float64))
    m = midpoints(v)
    assert m.shape == (3, 2, 3)
    torch.testing.assert_close(m[0], torch.tensor([[0.5, 0.5, 0.0]] * 2, dtype=torch.float64))
    assert midpoints(v[:1]).shape == (0, 2, 3)

