"""scikit-learn's two interleaving half circles ("moons"), 2D points with Gaussian noise of std 0.05."""

from __future__ import annotations

import numpy as np

from pipeline.core.datasets import Dataset, register


def load(cfg, seed: int, fetch=None, scratch=None):
    from sklearn.datasets import make_moons

    x, _ = make_moons(cfg.n_samples, noise=0.05, random_state=seed)
    return x.astype(np.float32), None  # which moon a point came from is not a class the GAN sees


register(Dataset("moons", kind="points", labels="none", load=load))
