"""A user's `.npz` file: `x` (N, 2) points or (N, [C,] H, W) images, optional `y` labels; a local
path (under data/inputs/ so that DVC sees edits) or s3://bucket/key."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.core.datasets import DataError, Dataset, Fetch, register


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
        if c not in (1, 3) or not (8 <= h <= 256 and 8 <= w <= 256):
            raise DataError(f"{path}: images must have 1 or 3 channels and sides 8..256, got {x.shape[1:]}")
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


register(
    Dataset(
        "npz",
        kind="any",
        labels="optional",
        load=lambda cfg, seed, fetch=None, scratch=None: load_npz(cfg.path, fetch),
        path="file",
    )
)
