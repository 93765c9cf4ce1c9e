"""The prepared data: a dataset (pipeline.core.datasets) loaded, split and described in a manifest.

Every loader returns `(x, y)` (or `(x, y, info)`): `x` float32, either points (N, D) in the data's
own scale or images (N, C, H, W) scaled to [-1, 1], or uint8 images (0..255) that are kept as the
memory-mappable store (`to_unit` maps rows to [-1, 1]); `y` int64 class labels (N,) or None.
Nothing here writes files except `save_prepared`, and `prepare` into the `scratch` folder it is given.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import ConfigError, DataConfig

# the datasets themselves live in pipeline/core/datasets/, one module each, registered by name
from pipeline.core.datasets import DATASETS, DataError, Fetch, rows_to_file
from pipeline.core.datasets.mixtures import Mixture, mixture, sample_mixture  # noqa: F401 (their home is datasets)
from pipeline.core.datasets.npz import load_npz  # noqa: F401


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
    """sha256 over each array's dtype, shape and bytes; read in chunks of rows, so a memory-mapped
    store is hashed without being held in memory (the digest is the same either way)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        h.update(f"{a.dtype.str}{a.shape}".encode())
        for i in range(0, max(len(a), 1), _HASH_ROWS if a.ndim else 1):
            h.update(np.ascontiguousarray(a[i : i + _HASH_ROWS] if a.ndim else a).tobytes())
    return h.hexdigest()


_HASH_ROWS = 4096


def to_unit(x: np.ndarray) -> np.ndarray:
    """Images as float32 in [-1, 1]: uint8 store rows (0..255) are mapped, float arrays returned as
    they are. Call it on the rows you use, not on a whole store."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    return x


def prepare(cfg: DataConfig, seed: int, fetch: Fetch | None = None, scratch: str | Path | None = None) -> Prepared:
    """Load the configured dataset, split it (seeded) and describe it in a manifest.

    `fetch` reads the bytes of a remote `data.path` (the stage passes an S3 reader). The manifest's
    content hash covers the arrays actually read, so it is the data's lineage even where DVC cannot
    track the source (a remote file is no DVC dependency unless brought in with `dvc import-url`).

    Datasets that give uint8 images (shapes, imagefolder) are kept as uint8: with `scratch` (the
    stage's output folder) they are decoded and split straight into memory-mapped `.npy` files
    there, so that memory does not grow with the data (`save_prepared` then only adds the rest).

    With `data.target` (CycleGAN) domain B is loaded and split the same way (seed + 1) and both
    domains are brought to the larger image side with `to_canvas`; the manifest describes A at the
    top level and B under `target`, and its content hash covers both.
    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: must be one of {' | '.join(DATASETS)}, got {cfg.name!r}")
    scratch = None if scratch is None else Path(scratch)

    def load(name: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
        got = DATASETS[name].load(cfg, seed, fetch=fetch, scratch=scratch)
        return (*got, {}) if len(got) == 2 else got

    if cfg.target is None:
        x, y, info = load(cfg.name)
        return _split(cfg.name, x, y, cfg.val_fraction, seed, info, scratch)
    targets = [n for n, d in DATASETS.items() if d.can_be_target]
    if cfg.target not in targets:
        raise ConfigError(f"data.target: must be one of {' | '.join(targets)}, got {cfg.target!r}")
    (xa, ya, _), (xb, yb, _) = load(cfg.name), load(cfg.target)
    side = max(xa.shape[-1], xb.shape[-1])
    a = _split(cfg.name, to_canvas(xa, side), ya, cfg.val_fraction, seed)
    b = _split(cfg.target, to_canvas(xb, side), yb, cfg.val_fraction, seed + 1)
    manifest = {**a.manifest, "target": b.manifest, "content_hash": content_hash(*a.arrays(), *b.arrays())}
    return Prepared(a.x_train, a.y_train, a.x_val, a.y_val, manifest, b)


def _split(
    name: str,
    x: np.ndarray,
    y: np.ndarray | None,
    val_fraction: float,
    seed: int,
    info: dict | None = None,
    scratch: Path | None = None,
) -> Prepared:
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
    store = x.dtype == np.uint8 and x.ndim == 4  # uint8 images: the memory-mappable store
    if store and scratch is not None:
        x_tr, x_va = rows_to_file(x, tr, scratch / "train.x.npy"), rows_to_file(x, va, scratch / "val.x.npy")
        for f in ("decoded.npy", "decoded_kept.npy"):  # the loader's scratch: not part of the output
            (scratch / f).unlink(missing_ok=True)  # (a mapping still open keeps its pages until closed)
    else:
        x_tr, x_va = x[tr], x[va]
    parts = (x_tr, pick(y, tr), x_va, pick(y, va))
    classes = None if y is None else int(y.max()) + 1
    lo, hi = _range(x_tr, x_va)
    manifest = {
        "dataset": name,
        "kind": "images" if x_tr.ndim == 4 else "points",
        "sample_shape": list(x_tr.shape[1:]),
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "classes": classes,
        "class_counts": None if y is None else np.bincount(y[tr], minlength=classes).tolist(),
        # the data's own label of each class 0..K-1, when they were remapped
        **({"label_ids": label_map} if label_map else {}),
        "range": [lo, hi],
        # uint8 images are kept as uint8 in memory-mappable .npy files (to_unit maps them to [-1, 1])
        **({"store": "npy-uint8"} if store else {}),
        **(info or {}),
        "seed": seed,
        "content_hash": content_hash(*parts),
    }
    return Prepared(*parts, manifest=manifest)


@dataclass(frozen=True)
class StoreFile:
    """A memory-mapped store array, handed to Ray workers by path: each maps the file itself, so
    the data are neither copied into the object store nor held in any process's private memory.
    When the store was also shipped through storage.root (pipeline.io.store_shipping.publish), `remote`,
    `sha256`, `size` and `mtime_ns` say where a node without the file at `path` fetches it, and what
    it must be."""

    path: str
    remote: str | None = None  # s3://<storage.root>/stores/<sha256>.npy
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None  # the driver's file's modification time
    endpoint: str | None = None  # the S3 endpoint (None: AWS)

    def local(self) -> bool:
        """Whether this node has the store at `path`: the same machine, or a shared path. When the store
        was shipped, a file there of another size or modification time is another store (another data
        version prepared at the same path on that node), not this one."""
        path = Path(self.path)
        if not path.is_file():
            return False
        st = path.stat()
        return self.size is None or (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)

    def open(self, fetched: str | Path | None = None) -> np.ndarray:
        """Map the store: the file at `path`, or `fetched`, this node's copy of `remote`
        (pipeline.io.store_shipping.open_store fetches it)."""
        if fetched is None and not self.local():
            import socket

            raise DataError(
                f"{self.path}: the prepared image store is not on this node ({socket.gethostname()}); "
                "run the workers where data/prepared is, on a shared path, or set storage.root to an "
                "s3:// URI: the store is then shipped to the other nodes"
            )
        return np.load(fetched or self.path, mmap_mode="c")  # copy-on-write: writable for torch, never written back


def shippable(a: np.ndarray | None):
    """What crosses to a Ray worker: a memory-mapped store array by its path, anything else as is (a
    memmap that lost its file, as one unpickled from Ray's object store, as a plain array)."""
    if isinstance(a, np.memmap):
        return StoreFile(str(Path(a.filename).resolve())) if a.filename else np.asarray(a)
    return a


def unship(a):
    """The worker's side of `shippable` (a store at its path; runtime.as_tensor also fetches a shipped one)."""
    return a.open() if isinstance(a, StoreFile) else a


def _range(*xs: np.ndarray) -> tuple[float, float]:
    """The smallest and largest value, in the [-1, 1] scale for uint8 images, read in chunks."""
    lo = min(float(x[i : i + _HASH_ROWS].min()) for x in xs for i in range(0, len(x), _HASH_ROWS))
    hi = max(float(x[i : i + _HASH_ROWS].max()) for x in xs for i in range(0, len(x), _HASH_ROWS))
    if xs[0].dtype == np.uint8:
        return lo / 127.5 - 1.0, hi / 127.5 - 1.0
    return lo, hi


def check_fits_model(manifest: dict, arch: str) -> None:
    """The prepared data's kind must suit `model.arch` (an npz can hold either): one line otherwise."""
    from pipeline.core.models import ARCHS

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
    """The arrays and the manifest into `out_dir`: `<split>.npz` (x, y), or for the uint8 store
    `<split>.x.npy` (memory-mappable) and `<split>.y.npy`; a store file `prepare` already wrote
    there is kept as it is."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = p.arrays()
    store = p.manifest.get("store") == "npy-uint8"
    for i, split in enumerate(SPLITS[: len(a) // 2]):
        x, y = a[2 * i], a[2 * i + 1]
        if store:
            path = out / f"{split}.x.npy"
            if not (isinstance(x, np.memmap) and Path(x.filename).resolve() == path.resolve()):
                np.save(path, x)
            if y is not None:
                np.save(out / f"{split}.y.npy", y)
            continue
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        np.savez(out / f"{split}.npz", **arrays)
    (out / "manifest.json").write_text(json.dumps(p.manifest, indent=2) + "\n")


def load_prepared(in_dir: str | Path) -> Prepared:
    """The prepared arrays, checked against the manifest's content hash. Store images (uint8) are
    memory-mapped copy-on-write: pages are read when used, shared between the processes of a node,
    and nothing is written back."""
    d = Path(in_dir)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"{mpath}: not found; run the prepare stage first (dvc repro prepare)")
    rerun = "rerun the prepare stage (dvc repro --force prepare)"
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise DataError(f"{mpath}: not readable JSON ({e}); {rerun}") from None
    if not isinstance(manifest, dict) or "content_hash" not in manifest:
        raise DataError(f"{mpath}: not a manifest the prepare stage wrote (no content_hash); {rerun}")
    store = manifest.get("store") == "npy-uint8"
    splits = []
    for split in SPLITS[: 4 if "target" in manifest else 2]:
        where = d / (f"{split}.x.npy" if store else f"{split}.npz")
        try:  # a missing, truncated or foreign file: numpy's and zipfile's words name no file
            if store:
                y_path = d / f"{split}.y.npy"
                splits += [np.load(where, mmap_mode="c"), np.load(y_path) if y_path.is_file() else None]
                continue
            with np.load(where) as f:
                splits += [f["x"], f["y"] if "y" in f.files else None]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            gist = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DataError(f"{where}: cannot be read ({gist}); {rerun}") from None
    if content_hash(*splits) != manifest["content_hash"]:
        raise DataError(f"{d}: arrays do not match the manifest's content hash; {rerun}")
    b = None if "target" not in manifest else Prepared(*splits[4:], manifest=manifest["target"])
    return Prepared(*splits[:4], manifest=manifest, b=b)
