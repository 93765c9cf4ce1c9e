"""scikit-learn's 1,797 8x8 handwritten digits (10 classes), shipped inside scikit-learn."""

from __future__ import annotations

import numpy as np

from pipeline.core.datasets import Dataset, register


def load(cfg, seed: int, fetch=None, scratch=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return x, d.target.astype(np.int64)


register(Dataset("digits", kind="images", labels="classes", load=load, can_be_target=True))
