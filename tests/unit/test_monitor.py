"""The stability monitor (pipeline.core.monitor) and its actions in the loop (pipeline.core.training).

Known answers from the theory, each through the real training loop (benchmarks/monitor_cases.py
builds the runs; benchmarks/bench_monitor.py runs the whole labelled set):
- the saturating minimax loss against a discriminator far ahead: G's slope D(G(z)) vanishes; the
  non-saturating loss in the same setting keeps it (its slope is 1 - D(G(z)));
- the Dirac GAN (the bilinear game theta * psi) under simultaneous gradient steps spirals out: the
  radius grows by sqrt(1 + lr^2) a step; alternating steps circle at a bounded radius;
- a generator forced to one output; a discriminator trained far longer than G on 64 reals;
- learning rates so large the scores overflow.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core import monitor, training
from pipeline.core.config import build_config, deep_merge

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "monitor_cases.py"
_spec = importlib.util.spec_from_file_location("monitor_cases", _PATH)
cases = importlib.util.module_from_spec(_spec)
sys.modules["monitor_cases"] = cases
_spec.loader.exec_module(cases)

TICK = 50  # train.monitor_every's default


def _case(name: str, **params) -> "cases.Case":
    case = next(c for c in cases.CASES if c.name == name)
    return cases.Case(
        case.name, deep_merge(case.params, params), case.expect, case.onset, case.alter, case.dirac, case.tags
    )


def _healthy_stream(n: int, **over) -> list[dict[str, float]]:
    base = {
        "loss/D": 1.3,
        "loss/G": 0.8,
        "D/acc_real": 0.6,
        "D/acc_fake": 0.65,
        "grad/D": 2.0,
        "grad/G": 1.5,
        "grad/G_fakes": 0.5,
        "grad/G_scores": 0.55,
        "fake/spread": 0.9,
        "weights/G": 20.0,
        "weights/D": 25.0,
        "ema/distance": 0.05,
    }
    return [{**base, "grad/D": 2.0 + 0.1 * math.sin(i), **over} for i in range(n)]


# ---- the rules, on signals given by hand ------------------------------------------------------


def test_a_healthy_stream_raises_nothing():
    m = monitor.Monitor()
    for i, s in enumerate(_healthy_stream(40)):
        assert m.observe((i + 1) * TICK, s) == []
    assert m.report()["verdict"] == "healthy" and m.report()["events"] == []


def test_a_non_finite_signal_is_divergence_at_once_naming_it():
    m = monitor.Monitor()
    m.observe(50, _healthy_stream(1)[0])
    (event,) = m.observe(100, {**_healthy_stream(1)[0], "loss/D": float("nan")})
    assert event["kind"] == "diverged" and event["step"] == 100
    assert event["evidence"]["non_finite"] == ["loss/D"] and event["evidence"]["loss/D"] == "nan"


def test_each_verdict_is_recorded_once_at_the_step_first_seen():
    m = monitor.Monitor()
    collapsed = _healthy_stream(12, **{"fake/spread": 0.01})
    steps = [e["step"] for i, s in enumerate(collapsed) for e in m.observe((i + 1) * TICK, s)]
    # after the warm-up (4 ticks), `patience` (3) ticks in a row: first seen at tick 7
    assert steps == [7 * TICK]
    assert m.verdict == "mode_collapse" and m.report()["problems"] == ["mode_collapse"]


def test_a_coverage_drop_from_the_live_evaluation_is_collapse():
    m = monitor.Monitor()
    stream = _healthy_stream(10)
    modes = [10, 20, 25, 25, 12, 11, 10, 10, 10, 10]  # half the best (25) or less from the 5th tick
    kinds = [
        (i + 1, e["kind"]) for i, (s, k) in enumerate(zip(stream, modes)) for e in m.observe(i + 1, s, {"modes": k})
    ]
    assert kinds == [(7, "mode_collapse")]


def test_the_state_carries_the_judgement_across_a_checkpoint():
    stream = _healthy_stream(6) + _healthy_stream(8, **{"fake/spread": 0.01})
    whole = monitor.Monitor()
    for i, s in enumerate(stream):
        whole.observe(i + 1, s)
    first, second = monitor.Monitor(), monitor.Monitor()
    for i, s in enumerate(stream[:8]):
        first.observe(i + 1, s)
    second.load_state_dict(first.state_dict())
    for i, s in enumerate(stream[8:], start=8):
        second.observe(i + 1, s)
    assert second.report() == whole.report() and whole.verdict == "mode_collapse"


def test_divergence_can_be_seen_again_after_a_rollback():
    m = monitor.Monitor()
    bad = {**_healthy_stream(1)[0], "grad/D": float("inf")}
    assert [e["kind"] for e in m.observe(1, bad)] == ["diverged"]
    assert m.observe(2, bad) == []  # recorded once
    m.rolled_back(2, 0, {"lr_g": 5e-4, "lr_d": 5e-4})
    assert [e["kind"] for e in m.observe(3, bad)] == ["diverged"]
    assert m.report()["rollbacks"] == 1 and m.verdict == "diverged"


def test_overfitting_needs_the_gap_to_held_out_reals():
    """D sure of every real it trains on is not overfitting when it is as sure of reals it never saw."""
    winning = _healthy_stream(10, **{"D/r_train": 0.95, "D/r_heldout": 0.9})
    memorising = _healthy_stream(10, **{"D/r_train": 0.95, "D/r_heldout": 0.2})
    for stream, expected in ((winning, []), (memorising, ["d_overfit"])):
        m = monitor.Monitor()
        assert [e["kind"] for i, s in enumerate(stream) for e in m.observe(i + 1, s)] == expected
    critic = monitor.Monitor(decision=False)  # Wasserstein critics: r_t means nothing
    assert [e for i, s in enumerate(memorising) for e in critic.observe(i + 1, s)] == []


# ---- known answers through the training loop -----------------------------------------------


def test_minimax_against_a_strong_d_vanishes_and_nonsaturating_does_not():
    small = {"model": {"hidden": 32}, "train": {"steps": 300, "batch_size": 128}}
    saturating = cases.run(_case("minimax vs a strong D (grid)", **small))
    assert saturating["first_seen"] is not None and saturating["first_seen"] <= 4 * TICK
    slope = saturating["report"]["events"][0]["evidence"]["grad/G_scores"]
    assert slope < 0.05  # |d/ds log(1 - sigmoid(s))| = D(G(z)): the fakes are rejected
    nonsat = cases.run(_case("minimax vs a strong D (grid)", loss={"name": "nonsaturating"}, **small))
    assert "vanishing_g_gradient" not in nonsat["problems"]
    assert nonsat["report"]["signals"]["grad/G_scores"] > 0.5  # 1 - D(G(z)) with D(G(z)) small


def test_dirac_gan_simultaneous_steps_spiral_out_alternating_ones_circle():
    spiral = cases.run(_case("Dirac GAN, simultaneous", train={"steps": 600}))
    assert spiral["first_seen"] is not None and spiral["first_seen"] <= 10 * TICK
    grown = spiral["report"]["events"]
    ev = next(e["evidence"] for e in grown if e["kind"] == "diverged")
    # the radius multiplies by sqrt(1 + lr^2) a step: 6 ticks of 50 steps at lr 0.1 give 1.01^150 = 4.4
    assert ev["ratio"] == pytest.approx((1 + 0.1**2) ** (0.5 * 6 * TICK), rel=0.1)
    circle = cases.run(_case("Dirac GAN, alternating", train={"steps": 600}))
    assert "diverged" not in circle["problems"] and circle["verdict"] == "oscillating"
    assert circle["first_seen"] <= 8 * TICK
    w = circle["report"]["signals"]
    assert math.hypot(w["weights/G"], w["weights/D"]) < 2.0  # bounded: it started at radius 1


def test_a_generator_collapsing_mid_run_is_flagged_within_four_ticks():
    r = cases.run(_case("G collapses at step 1000"), steps=1400)
    assert r["verdict"] == "mode_collapse" and 0 < r["delay"] <= 4 * TICK
    assert r["report"]["events"][0]["evidence"]["fake/spread"] < 1e-3


def test_d_trained_far_longer_than_g_on_64_reals_overfits():
    r = cases.run(_case("D overfits 64 digits"))
    assert "d_overfit" in r["problems"]
    ev = next(e["evidence"] for e in r["report"]["events"] if e["kind"] == "d_overfit")
    assert ev["r_t"] > 0.6 and ev["gap"] > 0.3


def test_overflowing_scores_diverge_at_the_first_tick():
    r = cases.run(_case("learning rates 1e6"))
    assert r["first_seen"] == TICK and re.match(rf"step {TICK}: \S+ is (nan|inf|-inf); stopping", r["error"])


def test_the_default_recipe_raises_no_flag():
    r = cases.run(_case("grid default"), steps=1500)
    assert r["verdict"] == "healthy", r["report"]["events"]


# ---- actions -----------------------------------------------------------------------------


def _dirac_run(steps: int, loss: dict | None = None, **train):
    case = _case("Dirac GAN, simultaneous", train={"steps": steps, **train}, loss=loss or {})
    cfg = cases.config(case)
    batches = cases.batches_for(case, cfg)
    gan = training.build_gan(cfg, [1])
    cases.dirac(gan, cfg)
    return gan, cfg, batches


def test_stop_ends_the_run_at_the_first_divergence():
    gan, cfg, batches = _dirac_run(1000, on_divergence="stop")
    with pytest.raises(training.Diverged, match=r"^step \d+: the run diverged .*train.on_divergence: stop"):
        training.train(gan, cfg, batches)
    assert gan.step < 1000 and "diverged" in gan.monitor.report()["problems"]


def test_warn_records_divergence_and_trains_on():
    gan, cfg, batches = _dirac_run(700, on_divergence="warn")
    training.train(gan, cfg, batches)
    assert gan.step == 700 and "diverged" in gan.monitor.report()["problems"]


def test_rollback_returns_to_a_healthy_state_with_lower_rates_and_is_deterministic():
    def run():
        gan, cfg, batches = _dirac_run(1500, on_divergence="rollback", max_rollbacks=1)
        events = []
        hooks = training.Hooks(on_event=lambda g, e: events.append((e, g.opt_g.param_groups[0]["lr"])))
        training.train(gan, cfg, batches, hooks)
        return gan, events

    gan, events = run()
    kinds = [e["kind"] for e, _ in events]
    at = kinds.index("diverged")
    assert kinds[at + 1] == "rollback" and kinds.count("rollback") == 1
    (rollback, lr), diverged = events[at + 1], events[at][0]
    assert rollback["step"] == diverged["step"] and rollback["evidence"]["to_step"] < diverged["step"] - 2 * TICK
    assert lr == pytest.approx(0.05) and rollback["evidence"]["lr_g"] == pytest.approx(0.05)  # halved, in effect
    assert gan.step == 1500 and gan.lr_scale == 0.5 and "diverged" in gan.monitor.report()["problems"]
    again, events_again = run()
    assert [e for e, _ in events_again] == [e for e, _ in events]
    assert all(torch.equal(a, b) for a, b in zip(gan.G.state_dict().values(), again.G.state_dict().values()))


def test_rollback_stops_the_run_past_max_rollbacks():
    gan, cfg, batches = _dirac_run(1500, on_divergence="rollback", max_rollbacks=0)
    with pytest.raises(training.Diverged, match=r"after 0 rollback\(s\) \(train.max_rollbacks 0\)"):
        training.train(gan, cfg, batches)


def test_a_run_resumed_across_a_rollback_matches_the_uninterrupted_one():
    whole, cfg, batches = _dirac_run(900, on_divergence="rollback", max_rollbacks=3)
    training.train(whole, cfg, batches)
    assert whole.monitor.report()["rollbacks"] >= 1
    first_rollback = next(e["step"] for e in whole.monitor.events if e["kind"] == "rollback")
    cut = (first_rollback // 100 - 1) * 100  # a checkpoint before the rollback
    half_cfg = build_config(deep_merge(cfg.to_dict(), {"train": {"steps": cut}}))
    half, _, batches = _dirac_run(cut, on_divergence="rollback", max_rollbacks=3)
    training.train(half, half_cfg, batches)
    state = training.gan_state(half)
    resumed, _, batches = _dirac_run(900, on_divergence="rollback", max_rollbacks=3)
    training.load_gan_state(resumed, state, cfg)
    training.train(resumed, cfg, batches)
    assert resumed.monitor.report() == whole.monitor.report()
    assert resumed.lr_scale == whole.lr_scale < 1
    assert all(torch.equal(a, b) for a, b in zip(whole.G.state_dict().values(), resumed.G.state_dict().values()))


def test_warn_still_stops_at_a_nan_after_the_divergence_was_recorded():
    """lr 0.5, no clipping to speak of: the spiral grows by sqrt(1.25) a step; `warn` records the
    divergence and trains on, until float32 overflows: from NaN nothing trains on, whatever was
    recorded before."""
    gan, cfg, batches = _dirac_run(3000, loss={"clip": 1.0e38}, on_divergence="warn", lr_g=0.5, lr_d=0.5)
    with pytest.raises(training.NonFiniteLoss, match=r"^step \d+: \S+ is (nan|inf)"):
        training.train(gan, cfg, batches)
    first = next(e["step"] for e in gan.monitor.events if e["kind"] == "diverged")
    assert first < gan.step < 3000


def test_one_sample_per_worker_has_no_spread_to_read():
    r = cases.run(_case("grid default", train={"batch_size": 1, "steps": 600}))
    assert "fake/spread" not in r["report"]["signals"] and "mode_collapse" not in r["problems"]


def test_every_window_measures_the_signals_whatever_its_length():
    r = cases.run(_case("collapsed G (grid)", train={"monitor_every": 5, "steps": 200}))
    assert r["verdict"] == "mode_collapse"  # 3 windows of 5 steps in a row after the warm-up
    assert r["first_seen"] == 5 * (4 + 3)


def test_a_resume_between_two_monitor_ticks_judges_as_the_uninterrupted_run():
    case = _case("G collapses at step 1000", train={"steps": 400, "checkpoint_every": 130})
    case = cases.Case(case.name, case.params, case.expect, 0, cases.collapse_from(200), case.dirac, case.tags)
    cfg = cases.config(case)

    def run(steps, state=None):
        c = build_config(deep_merge(cfg.to_dict(), {"train": {"steps": steps}}))
        batches = cases.batches_for(case, c)
        gan = training.build_gan(c, [2])
        case.alter(gan, c)
        begin = batches.begin

        def tick(step):
            gan.clock[0] = step
            begin(step)

        batches.begin = tick
        if state is not None:
            training.load_gan_state(gan, state, c)
        return training.train(gan, c, batches)

    whole = run(400)
    resumed = run(400, training.gan_state(run(130)))  # 130: inside the window 100..150
    assert whole.monitor.report() == resumed.monitor.report() and whole.monitor.verdict == "mode_collapse"
