"""The 2D mixtures of the PacGAN / VEEGAN protocol: the ring (8 modes on the unit circle, std 0.01)
and the grid (25 modes, std 0.05). Their modes are known, so mode coverage is measured exactly
(pipeline.core.metrics2d.mode_metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.datasets import Dataset, register
from pipeline.core.metrics2d import mode_metrics


@dataclass(frozen=True)
class Mixture:
    centers: np.ndarray  # (K, 2)
    std: float


def mixture(name: str) -> Mixture:
    """The ring (8 modes on the unit circle, std 0.01) or grid (25 modes, std 0.05)."""
    if name == "ring":
        angles = 2 * np.pi * np.arange(8) / 8
        return Mixture(np.stack([np.cos(angles), np.sin(angles)], 1), 0.01)
    if name == "grid":
        g = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
        return Mixture(np.array([(a, b) for a in g for b in g]), 0.05)
    raise KeyError(name)


def sample_mixture(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points drawn uniformly over the modes; returns (points, mode index)."""
    m = mixture(name)
    k = rng.integers(len(m.centers), size=n)
    x = m.centers[k] + m.std * rng.standard_normal((n, 2))
    return x.astype(np.float32), k.astype(np.int64)


def _mixture_dataset(name: str) -> Dataset:
    def load(cfg, seed: int, fetch=None, scratch=None):
        x, _ = sample_mixture(name, cfg.n_samples, np.random.default_rng(seed))
        return x, None  # mode ids are not class labels: an unconditional 2D GAN does not see them

    def metrics(fake: np.ndarray) -> dict[str, float]:
        return mode_metrics(fake, mixture(name))

    return Dataset(
        name,
        kind="points",
        labels="none",
        load=load,
        metrics=metrics,
        metric_names=("modes", "hq_fraction", "reverse_kl"),
        centers=lambda: mixture(name).centers,
    )


register(_mixture_dataset("ring"))
register(_mixture_dataset("grid"))
