"""The search's answer: chosen on validation rows, never worse there than a simple start; gains sized at --init.

A synthetic objective stands in for the model (a quadratic bowl with per-batch noise), so each property is checked
on many seeds in milliseconds; tests/test_hard_cases.py checks the same on tiny BERT experts.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from hf_glue.config import GlueConfig
from hf_glue.engine.matrix import CoefficientLayout
from hf_glue.methods import MergeContext, get_method
from hf_glue.methods.selection import Selection, snapshot_steps


class _Layout(CoefficientLayout):
    def __init__(self, experts: int = 3) -> None:
        self.expert_names = [f"e{k}" for k in range(experts)]
        self.groups = ["model"]
        self._device = torch.device("cpu")
        self._group_sizes = torch.ones(1, dtype=torch.float64)


class _Bowl:
    """L(α) = |α − α*|² + ⟨ξ_b, α⟩ on batch b (ξ_b ~ N(0, σ²) per batch, shared by the models of one step);
    the validation rows are a batch of their own with noise ``validation_noise``."""

    def __init__(self, optimum, sigma: float = 0.05, validation_noise=None) -> None:
        self.optimum = torch.tensor(optimum, dtype=torch.float64)
        self.sigma = sigma
        self.validation_noise = torch.zeros(len(optimum), dtype=torch.float64) if validation_noise is None else \
            torch.tensor(validation_noise, dtype=torch.float64)
        self.forward_passes = 0

    def loss(self, alphas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = alphas.reshape(-1, len(self.optimum)).double()
        self.forward_passes += len(a)
        return ((a - self.optimum) ** 2).sum(-1) + a @ noise

    def losses(self, alphas: torch.Tensor, batch: dict, reduce: bool = True) -> torch.Tensor:
        return self.loss(alphas, batch["noise"])

    def evaluate(self, alpha: torch.Tensor, batches) -> dict:
        return {"loss": float(self.loss(alpha, next(iter(batches))["noise"])[0])}

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield {"noise": self.sigma * torch.randn(len(self.optimum), generator=gen, dtype=torch.float64)}


def _run(bowl: _Bowl, config: GlueConfig, selection: bool = True, data_sizes=None):
    layout = _Layout(len(bowl.optimum))
    config = replace(config, data_sizes=data_sizes)
    chooser = Selection(bowl, lambda: [{"noise": bowl.validation_noise}], config, layout, rows=64, split_seed=0) \
        if selection else None
    ctx = MergeContext(matrix=layout, objective=bowl, batches=bowl.batches(config.seed), config=config,
                       selection=chooser)
    return get_method(config.method).run(ctx)


@pytest.mark.parametrize("seed", range(10))
def test_a_good_start_is_kept(seed):
    """The case the search used to walk away from: the screening finds the optimum (an even blend of two experts),
    where the gradient is only noise. Calibrated there, the gain is sized by the noise and the search wanders off
    (the old behaviour, checked below); calibrated at --init, the search's own answer (the mean of its last
    iterates, before any selection) stays at the optimum."""
    bowl = _Bowl([0.5, 0.5, 0.0])
    out = _run(bowl, GlueConfig(seed=seed))
    assert out.details["start"] == pytest.approx({"e0": 0.5, "e1": 0.5, "e2": 0.0})
    averaged = next(c for c in out.details["selection"]["candidates"] if c["name"].startswith("search: mean"))
    assert max(abs(averaged["coefficients"][f"e{k}"] - float(bowl.optimum[k])) for k in range(3)) < 0.05, averaged


def test_a_gain_sized_at_the_start_would_wander():
    """The planted bug: calibrating where the screening put the start (the optimum) throws the search off it."""
    from hf_glue.optim.spsa import SPSA

    bowl = _Bowl([0.5, 0.5, 0.0])
    far = []
    for seed in range(10):
        batches = bowl.batches(seed)
        spsa = SPSA(bowl.optimum.reshape(1, 3).clone(), "simplex", c=0.05, A=10, seed=seed,
                    average_from=50)
        spsa.calibrate(lambda a: bowl.losses(a, next(batches)), 0.1)
        for _ in range(100):
            spsa.step(lambda a: bowl.losses(a, next(batches)))
        far.append(float((spsa.result[0] - bowl.optimum).abs().max()))
    assert max(far) > 0.05, far


@pytest.mark.parametrize("method", ["glue", "cma", "nevergrad"])
@pytest.mark.parametrize("optimum", [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.5]])
def test_the_answer_is_never_worse_than_a_simple_start_on_the_validation_rows(method, optimum):
    """A screened start (an expert alone, an even blend) is optimal, and the validation rows disagree with the train
    batches (their own noise): whatever the search ends at, the answer's validation loss is the lowest of every
    candidate's, so at most that of uniform, data-size and each expert alone."""
    pytest.importorskip({"glue": "torch", "cma": "cma", "nevergrad": "nevergrad"}[method])
    bowl = _Bowl(optimum, sigma=0.2, validation_noise=[0.05, -0.05, 0.02])
    out = _run(bowl, GlueConfig(method=method, steps=40, seed=3), data_sizes=[10, 30, 60])
    record = out.details["selection"]
    losses = {c["name"]: c["loss"] for c in record["candidates"]}
    chosen = losses[record["chosen"]]
    assert chosen == min(losses.values())
    simple = ["uniform", "data-size", "expert: e0", "expert: e1", "expert: e2"]
    assert set(simple) <= set(losses) and all(chosen <= losses[name] for name in simple)
    assert any(c["kind"] == "search" for c in record["candidates"])
    validation = bowl.evaluate(out.alpha, [{"noise": bowl.validation_noise}])["loss"]
    assert validation == pytest.approx(chosen)
    assert record["validation_rows"] == 64 and record["forward_passes"] == len(
        {tuple(c["coefficients"].values()) for c in record["candidates"]})


def test_glue_starts_from_the_best_simple_start_on_the_validation_rows():
    """With validation rows the screening is their scores: no train batch is spent on it, and the start is the
    simple start the validation rows rank first (here the even blend of experts 0 and 2)."""
    bowl = _Bowl([0.5, 0.0, 0.5], sigma=0.0)
    config = GlueConfig(steps=20, seed=0)
    out = _run(bowl, config)
    assert out.details["screening"] == {"on": "validation rows", "chosen": "even blend: e0 + e2"}
    assert out.forward_passes == get_method("glue").forward_passes(config) + \
        out.details["selection"]["forward_passes"]


def test_a_tie_goes_to_the_simple_start():
    """A search that ends exactly on a simple start adds nothing: the start is named as the answer."""
    bowl = _Bowl([1.0, 0.0, 0.0], sigma=0.0)
    out = _run(bowl, GlueConfig(steps=10, seed=0))
    assert out.details["selection"]["chosen"] == "expert: e0"
    assert torch.equal(out.alpha, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))


def test_snapshots_fall_inside_the_search():
    assert snapshot_steps(100) == {20, 40, 60, 80}
    assert snapshot_steps(3) == {1, 2}
    assert snapshot_steps(1) == set()


def test_non_finite_candidates_are_never_chosen():
    class _Broken(_Bowl):
        def evaluate(self, alpha, batches):
            return {"loss": math.nan if float(alpha[0, 1]) > 0.9 else super().evaluate(alpha, batches)["loss"]}

    bowl = _Broken([0.0, 1.0, 0.0], sigma=0.0)
    out = _run(bowl, GlueConfig(steps=10, seed=0))
    record = out.details["selection"]
    assert next(c for c in record["candidates"] if c["name"] == "expert: e1")["loss"] is None
    assert record["chosen"] != "expert: e1"


def test_an_init_blend_without_a_finite_loss_is_calibrated_at_the_start():
    """The gain is sized at --init unless the --init blend has no finite loss there (e.g. uniform blends overflow):
    then it is sized at the screened start, and the search runs."""
    class _Overflow(_Bowl):
        def loss(self, alphas, noise):
            out = super().loss(alphas, noise)
            a = alphas.reshape(-1, len(self.optimum)).double()
            return torch.where((a > 0.2).all(-1), torch.full_like(out, math.nan), out)

    bowl = _Overflow([1.0, 0.0, 0.0], sigma=0.01)
    out = _run(bowl, GlueConfig(steps=20, seed=0))
    assert math.isfinite(out.details["calibrated_gain"]) and out.details["screening"]["chosen"] == "expert: e0"
    assert out.details["selection"]["chosen"] != "uniform"


def test_validation_rows_are_held_apart_from_the_search(cls_experts):
    """--validation-fraction 0.25 of 256 train rows: 64 rows, disjoint from the 192 the search draws from, drawn by
    --seed; the record says so. The default (0) scores the candidates on the search's own rows."""
    from hf_glue.config import DataConfig, ExpertsConfig
    from hf_glue.pipeline import batch_iterator, prepare, run_method

    config = GlueConfig(validation_fraction=0.25, steps=4, seed=3)
    prep = prepare(ExpertsConfig(experts=cls_experts["ids"]), DataConfig(dataset="org/target"), config)
    held, search = prep.validation._indices.column(0).to_pylist(), prep.search._indices.column(0).to_pylist()
    assert len(held) == 64 and len(search) == 192 and sorted(held + search) == list(range(256))
    batches = batch_iterator(prep, config, prep.search)  # what the searching methods draw from
    seen = set()
    for _ in range(12):  # two epochs of 6 batches of 32
        batch = next(batches)
        seen |= {tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"])}
    assert seen == {tuple(r["input_ids"]) for r in prep.search}
    assert not seen & {tuple(r["input_ids"]) for r in prep.validation}
    record = run_method(prep, config).details["selection"]
    assert record["held_apart"] and record["validation_rows"] == 64 and record["split_seed"] == 3
    default = prepare(ExpertsConfig(experts=cls_experts["ids"]), DataConfig(dataset="org/target"), GlueConfig())
    assert default.validation is default.search is default.train
    assert not run_method(default, GlueConfig(steps=4)).details["selection"]["held_apart"]


@pytest.mark.parametrize("rows, fraction, processes, message", [
    (1, 0.25, 1, "too few to hold validation rows apart"),
    (4, 0.0, 8, "fewer than the 8 processes"),
])
def test_too_few_rows_to_score_the_candidates_are_refused(rows, fraction, processes, message):
    from hf_glue.errors import GlueError
    from hf_glue.pipeline import check_search_rows

    with pytest.raises(GlueError, match=message):
        check_search_rows(rows, GlueConfig(validation_fraction=fraction, batch_size=4, parallel="perturbation"),
                          processes)


def test_reported_metrics_are_the_saved_weights(cls_experts):
    """bfloat16 experts: the search blends in float32, but the held-out metrics (and every candidate's score) are
    of the weights the saved model holds, rounded once to bfloat16 (run in float32 here, as the search runs)."""
    from hf_glue import ExpertsConfig, merge_experts
    from hf_glue.config import DataConfig
    from hf_glue.finetune import task_metrics
    from hf_glue.pipeline import prepare

    config = GlueConfig(method="weights", weights=[0.5, 0.3, 0.2])
    experts = ExpertsConfig(experts=cls_experts["ids"], dtype="bfloat16")
    result = merge_experts(cls_experts["ids"], "org/target", config, experts_config=experts)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    prep = prepare(experts, DataConfig(dataset="org/target"), config)
    saved = task_metrics(result.model.float(), prep.task, prep.eval, prep.processor, config.eval_batch_size)
    assert saved["loss"] == pytest.approx(result.eval["loss"], rel=1e-6, abs=1e-7)


class _Blocks(_Layout):
    """Two coefficient groups (blocks) of equal size."""

    def __init__(self, experts: int = 3) -> None:
        super().__init__(experts)
        self.groups = ["block.0", "block.1"]
        self._group_sizes = torch.ones(2, dtype=torch.float64)


class _BlockBowl(_Bowl):
    """The bowl per group: L(α) = Σ_g |α_g − α*_g|² + noise, for α of shape [n, 2, K]."""

    def __init__(self, optimum, sigma: float = 0.05, validation_noise=None) -> None:
        super().__init__(optimum, sigma, [0.0] * len(optimum[0]) if validation_noise is None else validation_noise)

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield {"noise": self.sigma * torch.randn(self.optimum.shape[-1], generator=gen, dtype=torch.float64)}

    def loss(self, alphas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = alphas.reshape(-1, *self.optimum.shape).double()
        self.forward_passes += len(a)
        return ((a - self.optimum) ** 2).sum((-2, -1)) + (a.sum(-2) @ noise) / 2


def _run_blocks(bowl: _BlockBowl, config: GlueConfig, checkpoint=None):
    layout = _Blocks(bowl.optimum.shape[-1])
    chooser = Selection(bowl, lambda: [{"noise": bowl.validation_noise}], config, layout, rows=64, split_seed=0)
    ctx = MergeContext(matrix=layout, objective=bowl, batches=bowl.batches(config.seed), config=config,
                       selection=chooser, checkpoint=checkpoint)
    return get_method(config.method).run(ctx)


def test_auto_granularity_searches_model_wide_then_per_group():
    """--granularity auto: half the steps with one α shared by every group, then per group from the best candidate
    so far; where the groups want different blends the per-group answer wins on the validation rows."""
    from hf_glue.methods.glue import search_phases

    # the second phase's gain calibration (4 probes) is paid from its steps: the forward passes of one search
    assert [(p.groups, p.steps) for p in search_phases(GlueConfig(granularity="auto", steps=101), 6)] == \
        [(1, 51), (6, 46)]
    assert [(p.groups, p.steps) for p in search_phases(GlueConfig(granularity="auto", steps=101, gain=0.1), 6)] == \
        [(1, 51), (6, 50)]
    assert [(p.groups, p.steps) for p in search_phases(GlueConfig(granularity="block"), 6)] == [(6, 100)]
    bowl = _BlockBowl([[0.8, 0.2, 0.0], [0.0, 0.2, 0.8]], sigma=0.0)
    config = GlueConfig(granularity="auto", steps=80, seed=0)
    out = _run_blocks(bowl, config)
    record = out.details["selection"]
    names = [c["name"] for c in record["candidates"]]
    assert any(", model-wide: step" in n for n in names) and any(", per group: step" in n for n in names)
    assert [(p["groups"], p["steps"]) for p in out.details["phases"]] == [(1, 40), (2, 36)]
    assert out.details["phases"][1]["calibrated_gain"] > 0  # sized where the per-group phase starts
    assert out.details["phases"][1]["start"] in names  # the per-group phase starts at a scored candidate
    model_wide = min(c["loss"] for c in record["candidates"] if "per group" not in c["name"])
    assert record["chosen"].startswith("search, per group") and min(
        c["loss"] for c in record["candidates"]) < model_wide - 0.1
    assert not torch.equal(out.alpha[0], out.alpha[1])
    assert out.forward_passes == get_method("glue").forward_passes(config) + record["forward_passes"]


def test_auto_granularity_saves_model_when_every_group_has_one_alpha():
    """The granularity a result records: auto's answer is model-wide exactly when all its rows are equal."""
    from types import SimpleNamespace

    from hf_glue.pipeline import answer_granularity

    full, adapters = SimpleNamespace(kind="full"), SimpleNamespace(kind="adapters")
    same = torch.tensor([[0.2, 0.8], [0.2, 0.8], [0.2, 0.8]], dtype=torch.float64)
    apart = same.clone()
    apart[1] = torch.tensor([0.3, 0.7])
    auto = GlueConfig(granularity="auto")
    assert answer_granularity(full, auto, same) == "model"
    assert answer_granularity(full, auto, apart) == "block"
    assert answer_granularity(adapters, auto, apart) == "module"
    assert answer_granularity(full, GlueConfig(granularity="block"), same) == "block"


def test_auto_granularity_resumes_to_the_uninterrupted_answer(tmp_path):
    """Interrupted inside the per-group phase, --resume ends where the uninterrupted search ends."""
    import os
    import signal

    from hf_glue.io.checkpoint import Checkpoint, SearchInterrupted

    config = GlueConfig(granularity="auto", steps=30, seed=2, checkpoint_every=3)
    straight = _run_blocks(_BlockBowl([[0.8, 0.2, 0.0], [0.0, 0.2, 0.8]]), config)

    class _Stopping(_BlockBowl):
        def losses(self, alphas, batch, reduce=True):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 27:  # 4 calibration probes, 15 model-wide steps, 4 probes again, 4 per-group steps
                os.kill(os.getpid(), signal.SIGINT)
            return super().losses(alphas, batch, reduce)

    ckpt = Checkpoint(tmp_path / "state", {"case": "auto"}, config.checkpoint_every)
    with pytest.raises(SearchInterrupted):
        _run_blocks(_Stopping([[0.8, 0.2, 0.0], [0.0, 0.2, 0.8]]), config, checkpoint=ckpt)
    resumed = _run_blocks(_BlockBowl([[0.8, 0.2, 0.0], [0.0, 0.2, 0.8]]), replace(config, resume=True),
                          checkpoint=ckpt)
    assert resumed.details["resumed_at_step"] > 15
    assert torch.equal(resumed.alpha, straight.alpha)
    assert [h["loss_plus"] for h in resumed.history] == [h["loss_plus"] for h in straight.history]


@pytest.mark.parametrize("method", ["cma", "nevergrad", "full-gradient"])
def test_auto_granularity_is_refused_for_the_other_searches(method):
    from hf_glue.errors import GlueError

    with pytest.raises(GlueError, match="--granularity auto is GLUE's"):
        GlueConfig(method=method, granularity="auto")


def test_compare_refuses_auto_for_the_other_searches_before_loading(cls_experts, tmp_path, monkeypatch, capsys):
    """compare's default methods include cma and full-gradient: --granularity auto names the method to leave out."""
    from hf_glue import pipeline
    from hf_glue.commands import main

    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("loaded before refusing"))
    code = main(["compare", "--experts", *cls_experts["ids"], "--dataset", "org/target", "--granularity", "auto",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "--granularity auto is GLUE's" in err and "out of --methods" in err, err
