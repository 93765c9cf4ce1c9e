"""pipeline.core.metrics2d: known answers for mode coverage, reverse KL and exact W1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from pipeline.core.data import mixture, sample_mixture
from pipeline.core.metrics2d import mode_metrics, reverse_kl, w1


@pytest.mark.parametrize("name, n_modes", [("grid", 25), ("ring", 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_true_mixture_scores_the_ceiling(name, n_modes, seed):
    x, _ = sample_mixture(name, 2500, np.random.default_rng(seed))
    m = mode_metrics(x, mixture(name))
    assert m["modes"] == n_modes
    assert 0.975 <= m["hq_fraction"] <= 1.0  # theory: 1 - exp(-4.5) = 0.9889
    assert 0.0 <= m["reverse_kl"] < 0.05


def test_hq_fraction_matches_theory_on_many_samples():
    x, _ = sample_mixture("grid", 20_000, np.random.default_rng(7))
    hq = mode_metrics(x, mixture("grid"))["hq_fraction"]
    # binomial sd at p=0.9889, n=20000 is 0.00074
    assert abs(hq - (1 - math.exp(-4.5))) < 0.004


@pytest.mark.parametrize("mode", [0, 12, 24])
def test_all_on_one_grid_mode(mode):
    m = mixture("grid")
    x = m.centers[mode] + 0.5 * m.std * np.random.default_rng(0).standard_normal((2500, 2))
    out = mode_metrics(x, mixture("grid"))
    assert out["modes"] == 1
    assert out["hq_fraction"] > 0.9
    assert abs(out["reverse_kl"] - math.log(25)) < 1e-9


def test_two_modes_half_each():
    m = mixture("ring")
    x = np.concatenate([np.repeat(m.centers[:1], 100, 0), np.repeat(m.centers[3:4], 100, 0)])
    out = mode_metrics(x, mixture("ring"))
    assert out["modes"] == 2 and out["hq_fraction"] == 1.0
    assert abs(out["reverse_kl"] - math.log(4)) < 1e-9  # KL((1/2, 1/2, 0...) || U(8)) = log(8/2)


@pytest.mark.parametrize("name", ["grid", "ring"])
def test_far_from_every_mode(name):
    # between modes (grid) or at the centre / far outside (ring): never within 3 std
    pts = {"grid": [[1.0, 1.0], [-3.0, 3.0], [10.0, 10.0]], "ring": [[0.0, 0.0], [5.0, 5.0], [0.5, 0.0]]}[name]
    x = np.repeat(np.array(pts), 50, 0)
    out = mode_metrics(x, mixture(name))
    assert out["hq_fraction"] == 0.0
    assert out["modes"] == 0
    assert abs(out["reverse_kl"] - math.log(len(mixture(name).centers))) < 1e-9


def test_hq_threshold_is_three_std():
    m = mixture("grid")
    inside = m.centers[6] + np.array([[2.9 * m.std, 0.0]])
    outside = m.centers[6] + np.array([[0.0, 3.1 * m.std]])
    assert mode_metrics(inside, mixture("grid"))["hq_fraction"] == 1.0
    assert mode_metrics(outside, mixture("grid"))["hq_fraction"] == 0.0


def test_reverse_kl_uniform_is_zero():
    assert reverse_kl(np.full(25, 7)) == pytest.approx(0.0, abs=1e-12)
    assert reverse_kl(np.zeros(8, int)) == pytest.approx(math.log(8))


# ---- W1 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [(3.0, 4.0), (-0.25, 0.1), (0.0, 2.0)])
def test_w1_translation(v):
    a = np.random.default_rng(0).normal(size=(200, 2))
    b = a + np.array(v)
    assert abs(w1(a, b) - math.hypot(*v)) < 1e-6


def test_w1_self_is_zero():
    a = np.random.default_rng(1).normal(size=(150, 2)).astype(np.float32)
    assert w1(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w1_equals_assignment_optimum(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(40, 2)), rng.normal(loc=0.5, size=(40, 2)) * 2
    cost = cdist(a, b)
    r, c = linear_sum_assignment(cost)
    assert w1(a, b) == pytest.approx(cost[r, c].mean(), abs=1e-9)


def test_w1_symmetric_and_unequal_sizes():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 2)), rng.normal(size=(45, 2)) + 1
    assert w1(a, b) == pytest.approx(w1(b, a), abs=1e-9)
    # two points vs. one: each at distance 1 and 3 -> mean 2
    assert w1(np.array([[0.0, 0.0], [4.0, 0.0]]), np.array([[1.0, 0.0]])) == pytest.approx(2.0)
