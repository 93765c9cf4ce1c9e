"""`imagefolder`: the user's own images, a local folder or an s3://bucket/prefix.

PNG, JPEG and WebP files are found recursively (in sorted path order, so the data are the same on
every machine). Each is decoded, converted to `data.channels` (3 = RGB, 1 = grey; default 3),
resized so that its short side is `data.resolution` (default 64; bicubic) and centre-cropped to a
square. With `data.labels: folders` the first sub-folder under `data.path` names the class (classes
in sorted name order, kept in the manifest as `class_names`); else the images are unlabelled.

Decoding runs in one process per core, a few large chunks of files per process, with a progress
line (images/s, ETA); the processes write their rows straight into the memory-mapped output. The images go straight into a uint8 array, on disk (a memory map in the stage's output folder)
when the stage gives one, so memory does not grow with the data.

Files that cannot be decoded are skipped, listed in the manifest (`skipped`) and counted in one
warning line; when more than MAX_BAD_FRACTION (1%) of the files fail, the stage fails naming a few.
An empty folder, or a prefix with no images, fails at once.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.datasets import DataError, Dataset, register, rows_to_file

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
FORMATS = ("PNG", "JPEG", "WEBP")  # the decoders PIL may try (the first is the likeliest)
DEFAULT_RESOLUTION = 64
MAX_BAD_FRACTION = 0.01  # more undecodable files than this fails the stage
MIN_CHUNK, MAX_CHUNK = 64, 2048  # files per decoding task


def list_images(root: str, fetch=None) -> list[str]:
    """The image files under `root` (a folder or s3:// prefix), sorted; DataError when there are none."""
    if root.startswith("s3://"):
        if fetch is None or not hasattr(fetch, "list"):
            raise DataError(f"data.path: no S3 reader given for {root}")
        found = fetch.list(root)
        base = root.rstrip("/") + "/"
        names = sorted(u for u in found if u.lower().endswith(EXTENSIONS) and u.startswith(base))
    else:
        path = Path(root)
        if not path.is_dir():
            raise DataError(f"data.path: not a folder: {root}")
        names = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not names:
        raise DataError(f"data.path: no PNG, JPEG or WebP images under {root}")
    return names


def folder_labels(root: str, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each file's class from its first sub-folder under `root`; (labels, class names in order)."""
    base = root.rstrip("/") + "/"
    firsts = []
    for n in names:
        rel = n[len(base) :] if n.startswith(base) else str(Path(n).relative_to(root))
        parts = rel.split("/")
        if len(parts) < 2:
            raise DataError(
                f"data.labels: folders takes the class from the sub-folder of each image, but {rel} lies "
                f"directly in {root}; move it into a class folder or set data.labels: none"
            )
        firsts.append(parts[0])
    classes = sorted(set(firsts))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[f] for f in firsts], np.int64), classes


def decode(blob: bytes | str, side: int, channels: int) -> np.ndarray:
    """One image file (its bytes or a path) -> (channels, side, side) uint8: short side resized to
    `side` (bicubic), centre-cropped. Raises on anything PIL cannot decode."""
    from PIL import Image, ImageOps

    mode = "RGB" if channels == 3 else "L"
    with Image.open(io.BytesIO(blob) if isinstance(blob, bytes) else blob, formats=FORMATS) as img:
        img.draft(mode, (side, side))  # JPEG: decode at a reduced scale
        # convert and fit return a copy when there is nothing to do: skip them (the same pixels)
        if img.mode != mode:
            img = img.convert(mode)
        if img.size != (side, side):
            img = ImageOps.fit(img, (side, side), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        a = np.asarray(img, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _decode_chunk(task) -> tuple[int, np.ndarray | None, list[tuple[int, str]]]:
    """Decode one chunk of files; into the rows [start, start + len(names)) of the memory-mapped
    `target` file when given (nothing to send back), else into a new array that is returned."""
    start, names, side, channels, fetch, target = task
    if target is None:
        out = np.zeros((len(names), channels, side, side), np.uint8)
    else:
        out = np.load(target, mmap_mode="r+")[start : start + len(names)]
    bad = []
    for i, name in enumerate(names):
        try:
            out[i] = decode(fetch(name) if name.startswith("s3://") else name, side, channels)
        except Exception as e:  # a corrupt or truncated file, or one PIL does not know
            bad.append((start + i, f"{type(e).__name__}: {e}"[:200]))
    if target is not None:
        out.flush()
        return start, None, bad
    return start, out, bad


def decode_all(
    names: list[str], side: int, channels: int, fetch=None, out: np.ndarray | None = None, workers: int | None = None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode every file into `out` (N, C, side, side) uint8 (a new array when None), in parallel
    with a progress line; returns (out, [(index, error)] of the files that failed). When `out` is a
    memory-mapped .npy file, the worker processes write their rows into it directly."""
    n = len(names)
    out = np.zeros((n, channels, side, side), np.uint8) if out is None else out
    workers = workers or os.cpu_count() or 1
    parallel = workers > 1 and n > MIN_CHUNK
    target = str(out.filename) if parallel and isinstance(out, np.memmap) else None
    if target is not None:
        out.flush()
    # a few large chunks per worker: little scheduling, a progress line every chunk or so
    chunk = min(MAX_CHUNK, max(MIN_CHUNK, -(-n // (4 * workers))))
    tasks = [(s, names[s : s + chunk], side, channels, fetch, target) for s in range(0, n, chunk)]
    bad: list[tuple[int, str]] = []
    progress = _Progress(n)
    if not parallel:
        results = map(_decode_chunk, tasks)
    else:  # fork: the children need only PIL and numpy, and start at once
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_decode_chunk, tasks)
    try:
        for (start, arr, b), task in zip(results, tasks):
            if arr is not None:
                out[start : start + len(arr)] = arr
            bad += b
            progress.update(len(task[1]))
    finally:
        if parallel:
            pool.terminate()
            pool.join()
    progress.done()
    return out, bad


class _Progress:
    """`[prepare] decoded k/N images (r img/s, ETA s)` on stderr, at most every 2 seconds."""

    def __init__(self, total: int):
        self.total, self.count, self.t0, self.last = total, 0, time.monotonic(), 0.0

    def update(self, k: int) -> None:
        self.count += k
        now = time.monotonic()
        if now - self.last >= 2.0 and self.count < self.total:
            self.last = now
            self._print(now)

    def done(self) -> None:
        self._print(time.monotonic())

    def _print(self, now: float) -> None:
        rate = self.count / max(now - self.t0, 1e-9)
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        print(
            f"[prepare] decoded {self.count}/{self.total} images ({rate:.0f} img/s, ETA {eta:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def load(cfg, seed: int, fetch=None, scratch: Path | None = None):
    side, channels = cfg.resolution or DEFAULT_RESOLUTION, cfg.channels or 3
    names = list_images(cfg.path, fetch)
    y, classes = folder_labels(cfg.path, names) if cfg.labels == "folders" else (None, None)
    out = None
    if scratch is not None:  # decode straight to disk: memory does not grow with the data
        out = np.lib.format.open_memmap(
            Path(scratch) / "decoded.npy", "w+", np.uint8, (len(names), channels, side, side)
        )
    x, bad = decode_all(names, side, channels, fetch, out)
    info: dict = {"source": cfg.path, "files": len(names)}
    if classes is not None:
        info["class_names"] = classes
    if bad:
        rel = lambda i: names[i][len(cfg.path.rstrip("/")) + 1 :]
        shown = "; ".join(f"{rel(i)} ({err})" for i, err in bad[:3])
        if len(bad) > MAX_BAD_FRACTION * len(names):
            raise DataError(
                f"data.path: {len(bad)} of {len(names)} images cannot be decoded (more than "
                f"{MAX_BAD_FRACTION:.0%}), e.g. {shown}"
            )
        print(
            f"[prepare] warning: skipped {len(bad)} of {len(names)} files that cannot be decoded: {shown}",
            file=sys.stderr,
        )
        info["skipped"] = [rel(i) for i, _ in bad]
        keep = np.setdiff1d(np.arange(len(names)), [i for i, _ in bad])
        x = x[keep] if scratch is None else rows_to_file(x, keep, Path(scratch) / "decoded_kept.npy")
        y = None if y is None else y[keep]
    return x, y, info


register(Dataset("imagefolder", kind="images", labels="optional", load=load, path="folder"))
