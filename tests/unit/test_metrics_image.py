"""pipeline.core.metrics_image: known answers on synthetic Gaussians and clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg
from threadpoolctl import threadpool_limits

from pipeline.core import metrics_image as M


@pytest.fixture(autouse=True)
def one_blas_thread():
    """As conftest.py does for torch: on a busy 2-core machine OpenBLAS threads spin-wait, and small
    matrix products ran 20 times slower with two threads than with one."""
    with threadpool_limits(1):
        yield


def gauss(n, d, seed, shift=0.0):
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


def clusters(n, seed, k=10, d=8, spread=0.3, keep=None):
    """n points from k well-separated Gaussian clusters (centres 10 apart), optionally only `keep`."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(k, d) if d >= k else 10.0 * np.random.default_rng(99).standard_normal((k, d))
    labels = rng.choice(keep if keep is not None else np.arange(k), size=n)
    return centres[labels] + spread * rng.standard_normal((n, d)), labels


def one_hot(labels, k=10):
    return np.eye(k)[labels]


# ---- FID ------------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    x = gauss(2000, 16, 0) * np.linspace(0.1, 3, 16)
    assert abs(M.fid(x, x)) < 1e-6
    assert M.fid(x, x + 0.1) > 0.1 * 0.1 * 16 * 0.99  # the mean term alone


def test_frechet_distance_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    exact = 1.0 + 4.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # 5 + (2^2 + 1^2 + 0) = 10
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(10.0, abs=1e-10)
    assert exact == pytest.approx(10.0)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2
    assert M.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_matches_an_independent_route_for_full_covariances():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    # Tr (S1 S2)^(1/2) = sum of sqrt eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2)
    r = linalg.sqrtm(s1).real
    tr = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_of_large_samples_approaches_the_closed_form():
    mu2, v1, v2 = np.array([1.0, 0, 0, 0]), np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 1.0, 0.25])
    exact = 1.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    a = np.sqrt(v1) * gauss(50_000, 4, 1)
    b = mu2 + np.sqrt(v2) * gauss(50_000, 4, 2)
    assert M.fid(a, b) == pytest.approx(exact, rel=0.05)


def test_fid_handles_singular_covariances():
    x = np.abs(gauss(500, 32, 0))
    x[:, :8] = 0.0  # dead units, as post-ReLU features have
    y = np.abs(gauss(500, 32, 1))
    y[:, 4:12] = 0.0
    assert abs(M.fid(x, x)) < 1e-6
    assert np.isfinite(M.fid(x, y)) and M.fid(x, y) > 1.0


# ---- KID ------------------------------------------------------------------------------------------


def test_kid_near_zero_for_halves_and_large_for_a_shift():
    x = gauss(2000, 16, 0)
    same, same_sd = M.kid(x[:1000], x[1000:], subsets=50, subset_size=500)
    shifted, _ = M.kid(x[:1000], gauss(1000, 16, 1, shift=0.5), subsets=50, subset_size=500)
    assert abs(same) < 0.01 and same_sd < 0.01
    assert shifted > 0.5  # about 16 * 0.5^2 / 16 * 3 + higher-order terms = 1.0
    assert shifted > 50 * abs(same)


def test_kid_is_unbiased_exact_mmd_on_a_tiny_case():
    a, b = gauss(4, 3, 0), gauss(4, 3, 1)
    k = lambda x, y: (x @ y / 3 + 1) ** 3
    xx = sum(k(a[i], a[j]) for i in range(4) for j in range(4) if i != j) / 12
    yy = sum(k(b[i], b[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(a[i], b[j]) for i in range(4) for j in range(4)) / 16
    mean, std = M.kid(a, b, subsets=3, subset_size=10)  # clipped to 4: every subset is the whole set
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_kid_is_seeded():
    a, b = gauss(600, 8, 0), gauss(600, 8, 1)
    assert M.kid(a, b, subsets=5, subset_size=100, seed=3) == M.kid(a, b, subsets=5, subset_size=100, seed=3)
    assert M.kid(a, b, subsets=5, subset_size=100, seed=3) != M.kid(a, b, subsets=5, subset_size=100, seed=4)


# ---- precision / recall / density / coverage -------------------------------------------------------


def test_precision_recall_identical_and_disjoint():
    x = gauss(500, 8, 0)
    assert M.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert M.precision_recall(x, gauss(500, 8, 1, shift=100.0)) == (0.0, 0.0)
    d, c = M.density_coverage(x, x.copy())
    assert c == 1.0 and d >= 1.0  # every sample lies in its own ball and its neighbours'
    assert M.density_coverage(x, gauss(500, 8, 1, shift=100.0)) == (0.0, 0.0)


def test_matching_distributions_score_near_one():
    m = M.manifold_metrics(gauss(2000, 8, 0), gauss(2000, 8, 1))
    assert m["precision"] > 0.6 and m["recall"] > 0.6
    assert 0.8 < m["density"] < 1.2 and m["coverage"] > 0.9


def test_precision_recall_separate_quality_from_diversity():
    real = gauss(1000, 4, 0)
    narrow = 0.3 * gauss(1000, 4, 1)  # all plausible, little variety
    m = M.manifold_metrics(real, narrow)
    assert m["precision"] > 0.95 and m["recall"] < 0.5
    wide = 3.0 * gauss(1000, 4, 2)  # covers everything, mostly implausible
    m = M.manifold_metrics(real, wide)
    assert m["precision"] < 0.5 and m["recall"] > 0.9


def test_coverage_falls_when_a_cluster_is_dropped():
    real, _ = clusters(2000, 0)
    full, _ = clusters(2000, 1)
    nine, _ = clusters(2000, 2, keep=np.arange(1, 10))
    m_full, m_nine = M.manifold_metrics(real, full), M.manifold_metrics(real, nine)
    assert m_full["coverage"] > 0.95
    assert m_nine["coverage"] == pytest.approx(m_full["coverage"] - 0.1, abs=0.04)
    assert m_nine["recall"] < m_full["recall"] - 0.05
    assert m_nine["precision"] == pytest.approx(m_full["precision"], abs=0.05)  # what is made is still good


def test_precision_recall_uses_the_kth_neighbour():
    # 1D: real at 0, 1, 2, 3 (3rd-NN radius of 0 is 3); one fake at -2.5 lies only in the ball of 0 (k=3)
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert M.knn_radii(real, 3).tolist() == [3.0, 2.0, 2.0, 3.0]
    assert M.knn_radii(real, 1).tolist() == [1.0, 1.0, 1.0, 1.0]
    fake = np.array([[-2.5], [-3.5], [1.5], [10.0]])
    precision, _ = M.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(2 / 4)


# ---- class metrics --------------------------------------------------------------------------------


def test_class_kl_known_answers():
    balanced = one_hot(np.arange(1000) % 10)
    assert M.class_kl(balanced) == pytest.approx(0.0, abs=1e-12)
    assert M.class_kl(one_hot(np.full(1000, 3))) == pytest.approx(math.log(10))
    ref = np.bincount(np.arange(1000) % 10)
    assert M.class_kl(balanced[np.random.default_rng(0).permutation(1000)], ref) == pytest.approx(0.0, abs=1e-12)
    half = one_hot(np.arange(1000) % 2)  # two classes, 50/50, against uniform over 10
    assert M.class_kl(half) == pytest.approx(math.log(5))
    # against a non-uniform reference: KL(p || q) by hand
    p_counts, q = np.array([600, 400]), np.array([0.3, 0.7])
    probs = one_hot(np.repeat([0, 1], p_counts), 2)
    expected = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert M.class_kl(probs, q) == pytest.approx(expected)
    assert np.isfinite(M.class_kl(probs, np.array([1.0, 0.0])))  # floor keeps it finite


def test_class_modes():
    assert M.class_modes(one_hot(np.arange(1000) % 10), 10) == 10
    assert M.class_modes(one_hot(np.full(100, 7)), 10) == 1
    # 4% in class 9 is under the default 5% share; 6% is over it
    labels = np.r_[np.zeros(960, int), np.full(40, 9)]
    assert M.class_modes(one_hot(labels), 10) == 1
    assert M.class_modes(one_hot(labels), 10, min_share=0.01) == 2
    labels = np.r_[np.zeros(940, int), np.full(60, 9)]
    assert M.class_modes(one_hot(labels), 10) == 2


def test_label_accuracy():
    labels = np.arange(100) % 10
    assert M.label_accuracy(one_hot(labels), labels) == 1.0
    assert M.label_accuracy(one_hot((labels + 1) % 10), labels) == 0.0
    wrong = labels.copy()
    wrong[:25] = (wrong[:25] + 1) % 10
    assert M.label_accuracy(one_hot(wrong), labels) == 0.75


# ---- bundles and invariances ---------------------------------------------------------------------------


def _sets():
    real, yr = clusters(600, 0)
    fake, yf = clusters(600, 1, keep=np.arange(8), spread=0.5)
    return real, one_hot(yr), fake, one_hot(yf)


def test_image_metrics_keys_and_values():
    real, pr, fake, pf = _sets()
    m = M.image_metrics(real, pr, fake, pf, 10, seed=0)
    assert list(m) == [
        "fid",
        "kid",
        "kid_std",
        "precision",
        "recall",
        "density",
        "coverage",
        "class_modes",
        "class_kl",
    ]
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in m.values())
    assert m["class_modes"] == 8 and 0.15 < m["class_kl"] < 0.3  # log(10/8) = 0.22 against ~uniform
    assert m["coverage"] < 0.85 and m["fid"] > 1.0
    floor = M.image_metrics(real, pr, clusters(600, 2)[0], one_hot(clusters(600, 2)[1]), 10)
    assert floor["fid"] < m["fid"] and floor["coverage"] > m["coverage"] and floor["class_modes"] == 10
    cheap = M.cheap_image_metrics(real, pr, fake, pf, 10)
    assert set(cheap) == {"fid", "precision", "recall", "class_modes", "class_kl"}
    assert all(cheap[k] == m[k] for k in ("fid", "precision", "recall", "class_modes", "class_kl"))


def test_metrics_do_not_depend_on_sample_order():
    real, pr, fake, pf = _sets()
    m = M.image_metrics(real, pr, fake, pf, 10)
    pa, pb = np.random.default_rng(5).permutation(600), np.random.default_rng(6).permutation(600)
    shuffled = M.image_metrics(real[pa], pr[pa], fake[pb], pf[pb], 10)
    for key in m:
        if key not in ("kid", "kid_std"):  # KID draws its subsets by index
            assert shuffled[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key
    # with subsets as large as the sets, KID sees all samples and is order-free too
    assert M.kid(real[pa], fake[pb], subsets=2)[0] == pytest.approx(M.kid(real, fake, subsets=2)[0], rel=1e-9)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="differ in width"):
        M.manifold_metrics(gauss(20, 4, 0), gauss(20, 5, 1))
    with pytest.raises(ValueError, match="at least"):
        M.precision_recall(gauss(3, 4, 0), gauss(20, 4, 1))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        M.fid(np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        M.kid(np.full((10, 2), np.nan), gauss(10, 2, 0))


def test_one_evaluator_selects_by_the_registry_and_a_new_metric_is_one_entry():
    real, pr, fake, pf = _sets()
    labels = pf.argmax(1)  # samples drawn for the labels the classifier gives them
    sets = M.Sets(real, pr, fake, pf, 10, seed=0, labels=labels)
    full, live = M.score(sets), M.score(sets, live=True)
    assert tuple(full) == M.metric_names(live=False, conditional=True)
    assert tuple(live) == M.metric_names(live=True, conditional=True)
    assert full["label_accuracy"] == 1.0 and "kid" in full and "kid" not in live and "density" not in live
    assert set(M.score(sets, live=True, classifier=False)) == {"fid"}  # a random extractor's classes mean nothing
    unlabelled = M.Sets(real, pr, fake, pf, 10)
    assert "label_accuracy" not in M.score(unlabelled) and M.score(unlabelled) == M.image_metrics(
        real, pr, fake, pf, 10
    )

    M.register_metric(
        "mean_gap",
        M.ImageMetric(
            ("mean_gap",),
            lambda s, live: {"mean_gap": float(np.abs(s.real_feats.mean(0) - s.fake_feats.mean(0)).sum())},
            ("mean_gap",),
        ),
    )
    try:
        assert (
            M.score(unlabelled, live=True)["mean_gap"] > 0 and M.score(M.Sets(real, pr, real, pr, 10))["mean_gap"] == 0
        )
        assert "mean_gap" in M.metric_names(live=True, conditional=False)
        with pytest.raises(ValueError, match="registered twice"):
            M.register_metric("mean_gap", M.IMAGE_METRICS["mean_gap"])
    finally:
        del M.IMAGE_METRICS["mean_gap"]
