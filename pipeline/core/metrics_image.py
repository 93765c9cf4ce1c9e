"""Image metrics on feature arrays (N, F) and class probabilities (N, K). Pure numpy / scipy / sklearn.

The features come from `pipeline.core.features` (a classifier trained on the real training split, or a
random-init fallback): numbers are comparable only between runs scored with the same extractor file.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the two feature sets.
  Biased upwards at small n: compare FIDs only at equal sample counts.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, mean and
  standard deviation over seeded random subsets. Unbiased, so it can dip slightly below 0.
- Improved precision / recall (Kynkaanniemi et al. 2019, k=3): a sample is on the other set's
  manifold when it lies within the k-th-nearest-neighbour radius (<=) of one of that set's samples.
- Density / coverage (Naeem et al. 2020, k=5): density counts real balls containing each fake
  sample, divided by k (about 1 for matching distributions, can exceed 1); coverage is the share of
  real samples whose ball (<) contains at least one fake sample.
- Class metrics from the extractor's arg-max labels: `class_modes`, `class_kl`, `label_accuracy`.

Costs: the neighbourhood metrics take O(N^2 F) time in chunks of bounded memory (10,000 x 10,000 at
F=128 runs in seconds); KID takes O(subsets * subset_size^2 * F).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import linalg
from sklearn.metrics import pairwise_distances_chunked
from sklearn.neighbors import NearestNeighbors

WORKING_MEMORY_MB = 256  # per chunk of the real-vs-fake distance matrix
KL_FLOOR = 1e-6  # reference share given to classes absent from the reference, so class_kl stays finite


# ---- FID / KID --------------------------------------------------------------------------------


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), N >= 2, in float64."""
    x = _feats(feats, "feats", min_n=2)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for Gaussians N(mu1, S1) and N(mu2, S2).

    The usual numerical handling (as in pytorch-fid): if the square root is not finite (near-
    singular product), `eps` is added to both diagonals; small imaginary parts from rounding are
    dropped, large ones (max |imag| on the diagonal > 1e-3) raise ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    assert mu1.shape == mu2.shape and s1.shape == s2.shape == (len(mu1), len(mu1)), "mismatched Gaussian parameters"
    with warnings.catch_warnings():
        # singular covariances are routine here (dead ReLU units, N < F); the result is checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if np.abs(np.diagonal(covmean).imag).max() > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F)."""
    return frechet_distance(*gaussian_stats(feat_a), *gaussian_stats(feat_b))


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = x @ y.T
    k /= x.shape[1]
    k += 1.0
    return k * k * k  # several times faster than k ** 3


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size sets with k(a, b) = (a.b / d + 1)^3."""
    m = len(x)
    kxx, kyy, kxy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(
    feat_a: np.ndarray, feat_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased polynomial-kernel MMD^2 over `subsets`
    pairs of random subsets (without replacement within a subset), drawn under `seed`.
    `subset_size` is clipped to the smaller set (at least 2 samples each)."""
    a, b = _feats(feat_a, "feat_a", min_n=2), _feats(feat_b, "feat_b", min_n=2)
    _same_dim(a, b)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            _poly_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(subsets)
        ]
    )
    return float(vals.mean()), float(vals.std())


# ---- precision / recall, density / coverage ----------------------------------------------------


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance (N,) from each sample to its k-th nearest other sample (duplicates count, at 0)."""
    x = _feats(feats, "feats", min_n=k + 1)
    d, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x).kneighbors()  # no query: self excluded
    return d[:, k - 1]


def manifold_metrics(real: np.ndarray, fake: np.ndarray, k_pr: int = 3, k_dc: int = 5) -> dict[str, float]:
    """precision, recall (k = k_pr) and density, coverage (k = k_dc) in one pass over the real-vs-fake
    distances, chunked to WORKING_MEMORY_MB. Needs more than max(k_pr, k_dc) samples in each set."""
    r, f = _feats(real, "real", min_n=max(k_pr, k_dc) + 1), _feats(fake, "fake", min_n=k_pr + 1)
    _same_dim(r, f)
    r_pr, r_dc, f_pr = knn_radii(r, k_pr), knn_radii(r, k_dc), knn_radii(f, k_pr)
    in_real = np.zeros(len(f), bool)  # fake sample inside some real k_pr-ball (precision)
    balls = np.zeros(len(f))  # real k_dc-balls containing the fake sample (density)
    in_fake = np.zeros(len(r), bool)  # real sample inside some fake k_pr-ball (recall)
    nearest_fake = np.full(len(r), np.inf)  # (coverage)
    start = 0
    for d in pairwise_distances_chunked(f, r, working_memory=WORKING_MEMORY_MB):  # rows: fake, columns: real
        rows = slice(start, start + len(d))
        in_real[rows] = (d <= r_pr).any(1)
        balls[rows] = (d < r_dc).sum(1)
        in_fake |= (d <= f_pr[rows, None]).any(0)
        np.minimum(nearest_fake, d.min(0), out=nearest_fake)
        start += len(d)
    return {
        "precision": float(in_real.mean()),
        "recall": float(in_fake.mean()),
        "density": float(balls.mean() / k_dc),
        "coverage": float((nearest_fake < r_dc).mean()),
    }


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii."""
    m = manifold_metrics(real, fake, k_pr=k, k_dc=k)
    return m["precision"], m["recall"]


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with k-NN radii of the real set."""
    m = manifold_metrics(real, fake, k_pr=k, k_dc=k)
    return m["density"], m["coverage"]


# ---- class metrics ------------------------------------------------------------------------------


def class_histogram(probs: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Counts (K,) of the arg-max classes of probabilities (N, K)."""
    probs = np.asarray(probs)
    return np.bincount(probs.argmax(1), minlength=num_classes or probs.shape[1])


def class_modes(probs: np.ndarray, num_classes: int, min_share: float | None = None) -> int:
    """Number of classes that receive at least `min_share` of the predicted labels.

    Default `0.5 / num_classes`: half the share a class has under a uniform histogram (5% for 10
    classes), so a class counts as covered only when the generator makes it about as often as the
    data does, not when a few misclassified artefacts land in it.
    """
    counts = class_histogram(probs, num_classes)
    share = counts / max(counts.sum(), 1)
    return int((share >= (0.5 / num_classes if min_share is None else min_share)).sum())


def class_kl(probs: np.ndarray, reference_hist: np.ndarray | None = None) -> float:
    """KL(p || q) in nats: p the predicted-class histogram of `probs` (N, K), q `reference_hist`
    (counts or shares over K classes; uniform when None). 0 for matching histograms, log K for
    single-class output against uniform. Classes absent from the reference get a share of KL_FLOOR
    (renormalised), so the value stays finite."""
    counts = class_histogram(probs)
    k = len(counts)
    p = counts / max(counts.sum(), 1)
    if reference_hist is None:
        q = np.full(k, 1.0 / k)
    else:
        q = np.asarray(reference_hist, np.float64)
        assert q.shape == (k,) and (q >= 0).all() and q.sum() > 0, f"reference_hist must be {k} non-negative counts"
        q = np.maximum(q / q.sum(), KL_FLOOR)
        q = q / q.sum()
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q[nz])).sum())


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of conditional samples G(z, y) classified as their label y."""
    labels = np.asarray(labels)
    assert len(labels) == len(probs), "one label per sample"
    return float((np.asarray(probs).argmax(1) == labels).mean())


# ---- the registry and the one evaluator ---------------------------------------------------------


@dataclass(frozen=True)
class Sets:
    """What an image metric reads: both sets in the extractor's space (features (N, F), class
    probabilities (N, K)), the number of classes, the seed of any random draw, and the labels the
    conditional samples were drawn for (None: unconditional, or an extractor that is no classifier)."""

    real_feats: np.ndarray
    real_probs: np.ndarray
    fake_feats: np.ndarray
    fake_probs: np.ndarray
    num_classes: int
    seed: int = 0
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class ImageMetric:
    """One entry of `IMAGE_METRICS`: `compute(sets, live)` returns the values of `keys` (of `live_keys`
    when `live`: the cheap evaluation during training and in Tune trials; () = the evaluate stage only).
    `any_extractor`: meaningful in a random extractor's space (live evaluation with one reports only
    these). `conditional`: needs `Sets.labels`."""

    keys: tuple[str, ...]
    compute: Callable[[Sets, bool], dict[str, float]]
    live_keys: tuple[str, ...] = ()
    any_extractor: bool = False
    conditional: bool = False


IMAGE_METRICS: dict[str, ImageMetric] = {}


def register_metric(name: str, metric: ImageMetric) -> ImageMetric:
    if name in IMAGE_METRICS:
        raise ValueError(f"image metric {name!r} registered twice")
    IMAGE_METRICS[name] = metric
    return metric


def _kid(s: Sets, live: bool) -> dict[str, float]:
    mean, std = kid(s.real_feats, s.fake_feats, seed=s.seed)
    return {"kid": mean, "kid_std": std}


def _manifold(s: Sets, live: bool) -> dict[str, float]:
    if live:  # k = 3 for both pairs: one neighbour search serves the live pair
        m = manifold_metrics(s.real_feats, s.fake_feats, k_pr=3, k_dc=3)
        return {"precision": m["precision"], "recall": m["recall"]}
    return manifold_metrics(s.real_feats, s.fake_feats)


def _class_kl(s: Sets, live: bool) -> dict[str, float]:
    """Against the real set's predicted-class histogram, so real data scores 0 (against uniform it
    differs by under 0.01 nats on MNIST, whose classes are nearly balanced)."""
    return {"class_kl": class_kl(s.fake_probs, class_histogram(s.real_probs, s.num_classes))}


register_metric(
    "fid",
    ImageMetric(("fid",), lambda s, live: {"fid": fid(s.real_feats, s.fake_feats)}, ("fid",), any_extractor=True),
)
register_metric("kid", ImageMetric(("kid", "kid_std"), _kid))
register_metric(
    "manifold", ImageMetric(("precision", "recall", "density", "coverage"), _manifold, ("precision", "recall"))
)
register_metric(
    "class_modes",
    ImageMetric(
        ("class_modes",), lambda s, live: {"class_modes": class_modes(s.fake_probs, s.num_classes)}, ("class_modes",)
    ),
)
register_metric("class_kl", ImageMetric(("class_kl",), _class_kl, ("class_kl",)))
register_metric(
    "label_accuracy",
    ImageMetric(
        ("label_accuracy",),
        lambda s, live: {"label_accuracy": label_accuracy(s.fake_probs, s.labels)},
        ("label_accuracy",),
        conditional=True,
    ),
)


def _selected(live: bool, classifier: bool, conditional: bool):
    for m in IMAGE_METRICS.values():
        if (live and not m.live_keys) or (m.conditional and not conditional):
            continue
        if live and not classifier and not m.any_extractor:
            continue
        yield m


def score(sets: Sets, live: bool = False, classifier: bool = True) -> dict[str, float]:
    """Every registered metric that applies: the evaluate stage's set, or (`live`) the cheap one. The
    live evaluation, the evaluate stage, CycleGAN's evaluation and the benchmarks all call this."""
    out: dict[str, float] = {}
    for m in _selected(live, classifier, sets.labels is not None):
        out.update(m.compute(sets, live))
    return out


def metric_names(live: bool, conditional: bool, classifier: bool = True) -> tuple[str, ...]:
    """The keys `score` returns: what Tune can select and compare (`tune.metric`)."""
    return tuple(k for m in _selected(live, classifier, conditional) for k in (m.live_keys if live else m.keys))


def image_metrics(
    real_feats: np.ndarray,
    real_probs: np.ndarray,
    fake_feats: np.ndarray,
    fake_probs: np.ndarray,
    num_classes: int,
    seed: int = 0,
) -> dict[str, float]:
    """All unconditional image metrics of a generated set against the real set: fid, kid, kid_std,
    precision, recall, density, coverage, class_modes, class_kl. `seed` draws the KID subsets."""
    return score(Sets(real_feats, real_probs, fake_feats, fake_probs, num_classes, seed))


def cheap_image_metrics(
    real_feats: np.ndarray,
    real_probs: np.ndarray,
    fake_feats: np.ndarray,
    fake_probs: np.ndarray,
    num_classes: int,
) -> dict[str, float]:
    """fid, precision, recall, class_modes, class_kl: milliseconds for a few thousand samples, for use
    during training. The caller picks the (small) sample; FID is biased at small n, so keep n fixed
    across a run. Recall catches what the class metrics cannot: a generator drawing one image per class."""
    return score(Sets(real_feats, real_probs, fake_feats, fake_probs, num_classes), live=True)


# ---- checks ----------------------------------------------------------------------------------------


def _feats(x: np.ndarray, name: str, min_n: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: features must be (N, F), got shape {x.shape}")
    if len(x) < min_n:
        raise ValueError(f"{name}: needs at least {min_n} samples, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in width: {a.shape[1]} vs {b.shape[1]}")
