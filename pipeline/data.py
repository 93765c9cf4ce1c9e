"""The prepared data: a dataset (pipeline.datasets) loaded, split and described in a manifest.

Every loader returns `(x, y)`: `x` float32, either points (N, D) in the data's own scale or images
(N, C, H, W) scaled to [-1, 1]; `y` int64 class labels (N,) or None. Nothing here writes files
except `save_prepared`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, DataConfig

# the datasets themselves live in pipeline/datasets/, one module each, registered by name
from pipeline.datasets import DATASETS, DataError, Fetch
from pipeline.datasets.mixtures import Mixture, mixture, sample_mixture  # noqa: F401 (their home is datasets)
from pipeline.datasets.npz import load_npz  # noqa: F401


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
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: must be one of {' | '.join(DATASETS)}, got {cfg.name!r}")
    load = lambda name: DATASETS[name].load(cfg, seed, fetch=fetch)
    if cfg.target is None:
        return _split(cfg.name, *load(cfg.name), cfg.val_fraction, seed)
    targets = [n for n, d in DATASETS.items() if d.can_be_target]
    if cfg.target not in targets:
        raise ConfigError(f"data.target: must be one of {' | '.join(targets)}, got {cfg.target!r}")
    (xa, ya), (xb, yb) = load(cfg.name), load(cfg.target)
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
    from pipeline.models import ARCHS

    kind, shape = manifest["kind"], manifest["sample_shape"]

    def takes(a) -> bool:
        try:
            a.check_shape(shape)
        except ValueError:
            return False
        return a.kind == kind

    fits = [name for name, a in ARCHS.items() if takes(a)]
    if arch not in fits:
        what = f"images {tuple(shape)}" if kind == "images" else f"{shape[0]}D points"
        raise DataError(f"model.arch: the prepared data are {what}, which need {' or '.join(fits)}, got {arch}")


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
