"""The feature extractor for image metrics: a small CNN classifier trained on the real training split.

Nothing can be downloaded here, so there is no Inception network: FID, KID, precision/recall and
density/coverage are computed in the penultimate layer of `FeatureNet`, a classifier trained by
`train_extractor` on the same real data the GAN learns from. Its class probabilities give the class
metrics (class modes, class KL, label accuracy of conditional generators).

Numbers are only comparable when they come from the same extractor file: a retrained extractor
(another seed, other data) has another feature space. For unlabelled data `random_extractor` gives a
randomly initialised, untrained FeatureNet (`info["extractor"] == "random-init"`); its features still
separate distributions (random CNN features are a known, weaker baseline), but its class
probabilities mean nothing, and its numbers must never be compared with a classifier's.

Pure torch, no I/O except `save_extractor` / `load_extractor`. Deterministic on CPU for a given seed
and thread count; the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.core.data import to_unit

FEATURE_DIM = 128
WIDTH = 16  # channels of the first conv block; doubled at each of the three blocks


class FeatureNet(nn.Module):
    """Images (N, C, H, W) in [-1, 1], sides 8..256 -> logits (N, num_classes).

    Three conv blocks (3x3 conv, 2x2 max-pool in the first two, BatchNorm, ReLU), an adaptive
    average pool to 2x2, then the penultimate layer `features` (Linear + ReLU, `feature_dim` units)
    and a linear classifier head. About 0.1 M parameters at the defaults.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_classes: int,
        feature_dim: int = FEATURE_DIM,
        width: int = WIDTH,
    ):
        super().__init__()
        c, h, w = shape
        assert 8 <= h <= 256 and 8 <= w <= 256, f"FeatureNet needs image sides 8..256, got {shape}"
        self.shape, self.num_classes, self.feature_dim, self.width = tuple(shape), num_classes, feature_dim, width
        ch = [c, width, 2 * width, 4 * width]
        blocks: list[nn.Module] = []
        for i in range(3):
            blocks.append(nn.Conv2d(ch[i], ch[i + 1], 3, padding=1, bias=False))
            if i < 2:  # pooling before BatchNorm/ReLU: the same function class, a third less CPU time
                blocks.append(nn.MaxPool2d(2))
            blocks += [nn.BatchNorm2d(ch[i + 1]), nn.ReLU()]
        self.conv = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(ch[-1] * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.to(memory_format=torch.channels_last)  # about 25% faster convolutions on CPU

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, feature_dim), non-negative (post-ReLU, like Inception's pool features)."""
        return self.embed(self.conv(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def config(self) -> dict[str, Any]:
        """Constructor arguments: enough to rebuild the net from a state dict."""
        return {
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "width": self.width,
        }


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], edges replicated.

    Written by hand because torchvision does not import beside the CPU torch wheel here.
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    idx = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[idx, chans, rows, cols]


def default_epochs(n_train: int, batch_size: int, steps: int = 500, lo: int = 5, hi: int = 30) -> int:
    """Epochs giving about `steps` optimizer steps, clipped to [lo, hi]: at batch 128, 14 for
    MNIST-5k (36 steps per epoch) and 30 for digits (13 steps per epoch)."""
    per_epoch = math.ceil(n_train / batch_size)
    return int(min(hi, max(lo, math.ceil(steps / per_epoch))))


def train_extractor(
    x_train: np.ndarray,
    y_train: np.ndarray,
    num_classes: int,
    seed: int,
    epochs: int | None = None,
    batch_size: int = 128,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    lr: float = 3e-3,
    max_shift: int | None = None,
) -> tuple[FeatureNet, dict[str, Any]]:
    """Train a FeatureNet classifier on real images (N, C, H, W) in [-1, 1] and labels (N,) int.

    Adam with a one-cycle learning-rate schedule, label smoothing 0.1, and random shifts of up to
    `max_shift` pixels (default: side // 14, so 2 on 28x28 and 0 on 8x8, where one pixel is an
    eighth of the digit). `epochs` defaults to `default_epochs`. Seeded and deterministic on CPU:
    the same seed, data and thread count give identical weights. Uses the caller's torch thread
    setting. Returns the model in eval mode and `info` (plain types, so it survives a weights-only
    load) with `val_accuracy` (None without validation data), `train_accuracy`, ... and nothing that
    differs between two runs (no wall time): the saved extractor, its hash in every evaluation's
    protocol, and the runs scored in it are the same for the same seed and data.
    """
    x = torch.as_tensor(np.asarray(to_unit(np.asarray(x_train)), dtype=np.float32))
    y = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    assert x.ndim == 4 and len(x) == len(y), "train_extractor needs images (N, C, H, W) and labels (N,)"
    epochs = default_epochs(len(x), batch_size) if epochs is None else epochs
    max_shift = min(x.shape[2], x.shape[3]) // 14 if max_shift is None else max_shift
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureNet(tuple(x.shape[1:]), num_classes)
        g = torch.Generator().manual_seed(seed)
        _fit(model, x, y, epochs, batch_size, lr, max_shift, g)
    model.eval()
    info = {
        "extractor": "classifier",
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_shift": max_shift,
        "n_train": len(x),
        "train_accuracy": accuracy(model, x_train, y_train),
        "val_accuracy": None if x_val is None or len(x_val) == 0 else accuracy(model, x_val, y_val),
        "n_val": 0 if x_val is None else len(x_val),
    }
    return model, info


def _fit(model, x, y, epochs, batch_size, lr, max_shift, g) -> None:
    steps_per_epoch = math.ceil(len(x) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, g)), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def random_extractor(
    shape: tuple[int, int, int] | list[int], seed: int, num_classes: int = 10, feature_dim: int = FEATURE_DIM
) -> tuple[FeatureNet, dict[str, Any]]:
    """The fallback for unlabelled data: a randomly initialised FeatureNet, not trained.

    Weights are drawn He-normal (fan-in, ReLU gain) so activations keep their scale through the
    layers (PyTorch's default init shrinks them about 30x here, which would leave KID's cubic kernel
    nearly linear); BatchNorm keeps its initial statistics (mean 0, variance 1), so the net is a
    fixed random function of the image. Only its features are meaningful: class probabilities, and
    so class_modes / class_kl / label accuracy, are not. `info["extractor"] == "random-init"`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureNet(tuple(shape), num_classes, feature_dim)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval(), {"extractor": "random-init", "seed": seed, "val_accuracy": None}


@torch.no_grad()
def embed(model: FeatureNet, x: np.ndarray | torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, feature_dim) float64 and class probabilities (N, num_classes) float64 of images
    (N, C, H, W) in [-1, 1], in eval mode without gradients. The result does not depend on
    `batch_size` (up to float rounding); the model's train/eval mode is restored afterwards."""
    # numpy input (a memory-mapped uint8 store too) is converted a batch at a time
    rows = (lambda a: a.float()) if torch.is_tensor(x) else (lambda a: torch.as_tensor(_float32(a)))
    if tuple(x.shape[1:]) != model.shape:
        raise ValueError(f"images of shape {tuple(x.shape[1:])} do not fit the extractor, trained on {model.shape}")
    was_training = model.training
    model.eval()
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(rows(x[i : i + batch_size]))
        feats.append(f)
        probs.append(torch.softmax(model.head(f), 1))
    model.train(was_training)
    if not feats:
        return np.zeros((0, model.feature_dim)), np.zeros((0, model.num_classes))
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


def _float32(a: np.ndarray) -> np.ndarray:
    return np.asarray(to_unit(np.asarray(a)), dtype=np.float32)


def accuracy(model: FeatureNet, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of images whose arg-max class is the label."""
    _, probs = embed(model, x)
    return float((probs.argmax(1) == np.asarray(y)).mean())


def save_extractor(model: FeatureNet, info: dict[str, Any], path: str | Path) -> None:
    """One file: constructor arguments, state dict and info (plain types only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.config(), "state_dict": model.state_dict(), "info": info}, path)


def load_extractor(path: str | Path) -> tuple[FeatureNet, dict[str, Any]]:
    """Rebuild a saved extractor (weights-only load), in eval mode, with its info."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature extractor not found")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = blob["config"]
    model = FeatureNet(tuple(cfg["shape"]), cfg["num_classes"], cfg["feature_dim"], cfg["width"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["info"]
