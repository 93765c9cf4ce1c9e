"""The dataset registry: every module of this package registers the datasets it defines.

A `Dataset` declares what the rest of the pipeline asks about it, so that no other module lists
dataset names:
  - `kind`: "points" (N, 2) or "images" (N, C, H, W); "any" when the file decides (an npz), in which
    case the prepared manifest's `kind` says;
  - `labels`: "classes" (always labelled), "none", or "optional" (the file or folder decides);
  - `load(cfg, seed, fetch, scratch)`: the arrays `(x, y)` or `(x, y, info)`: `x` float32 (points in
    their own scale, images in [-1, 1]) or uint8 images (0..255, kept so in the prepared store), `y`
    int64 labels or None, `info` a dict for the manifest; `fetch` reads a remote (s3://) path's bytes
    (`fetch.list(prefix)` lists one); `scratch`, when given, is a folder where a loader may write a
    large array as a memory map (`decoded.npy`) instead of holding it in memory;
  - `metrics` and `metric_names`: known-answer metrics of generated points (the mixtures' modes), and
    `centers`, the modes to draw on plots.

Adding a dataset is one module here (it calls `register`) plus its test; the config's `data.name`,
the cross-checks with `model.arch`, the in-training and final evaluation and the tune metric list
all ask this registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core import metrics2d

Fetch = Callable[[str], bytes]
Loader = Callable[..., "tuple[np.ndarray, np.ndarray | None]"]


class DataError(ValueError):
    """Bad or missing input data; the message names the file or key."""


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # points | images | any
    labels: str  # classes | none | optional
    load: Loader
    metrics: Callable[[np.ndarray], dict[str, float]] | None = None  # known answers for generated points
    metric_names: tuple[str, ...] = ()  # the keys `metrics` returns
    centers: Callable[[], np.ndarray] | None = None  # modes drawn on the 2D plots
    path: str | None = None  # what data.path names, when required: "file" or "folder" (a local one or an s3:// prefix)
    can_be_target: bool = False  # a CycleGAN domain B (a built-in image set)

    def __post_init__(self) -> None:
        assert self.kind in ("points", "images", "any"), self.kind
        assert self.labels in ("classes", "none", "optional"), self.labels


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    if dataset.name in DATASETS:
        raise ValueError(f"dataset {dataset.name!r} registered twice")
    DATASETS[dataset.name] = dataset
    return dataset


def get(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"data.name: must be one of {' | '.join(DATASETS)}, got {name!r}")
    return DATASETS[name]


def point_scores(name: str, fake: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Generated points scored against real ones: exact W1 (pipeline.core.metrics2d), plus the dataset's
    known-answer metrics when it has them. The in-training and the final evaluation both call this."""
    out = {"w1": metrics2d.w1(fake, real)}
    ds = DATASETS.get(name)
    if ds is not None and ds.metrics is not None:
        out.update(ds.metrics(fake))
    return out


def point_metric_names(name: str) -> tuple[str, ...]:
    """The keys `point_scores` returns for this dataset."""
    ds = DATASETS.get(name)
    return ("w1", *(ds.metric_names if ds else ()))


def centers(name: str) -> np.ndarray | None:
    """The modes to draw on a 2D plot of this dataset, None when it has none."""
    ds = DATASETS.get(name)
    return None if ds is None or ds.centers is None else ds.centers()


def kind(name: str) -> str | None:
    """points | images for a built-in dataset; None when the file decides (an npz) until prepare."""
    ds = DATASETS.get(name)
    return None if ds is None or ds.kind == "any" else ds.kind


_CHUNK_ROWS = 4096


def rows_to_file(x: np.ndarray, rows: np.ndarray, path: Path) -> np.ndarray:
    """x[rows] written to a new memory-mapped .npy file, a chunk at a time (rows read in sorted
    order within each chunk, which a disk prefers)."""
    out = np.lib.format.open_memmap(path, "w+", x.dtype, (len(rows), *x.shape[1:]))
    for i in range(0, len(rows), _CHUNK_ROWS):
        idx = rows[i : i + _CHUNK_ROWS]
        order = np.argsort(idx)
        chunk = np.empty((len(idx), *x.shape[1:]), x.dtype)
        chunk[order] = x[idx[order]]
        out[i : i + len(idx)] = chunk
    out.flush()
    return out


def _register_all() -> None:
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}")


_register_all()
