"""The image store (issue #14): prepare's decoding throughput, training from the memory-mapped store,
and a train worker's private memory as the store grows. Not a test.

    python benchmarks/bench_store.py [--files 20000] [--big 200000] [--small 10000] [--steps 200]
                                     [--only prepare|step|memory]

1. prepare: decode + resize a folder of `--files` 64x64 PNGs to 64x64 with `imagefolder.decode_all`
   (one process per core, writing into a memory-mapped file, as prepare does) against a plain
   single-process PIL loop doing the same (open, convert, fit) into an in-memory array.
   Target: >= 1.6x on 2 cores. Then the same with 128x128 PNGs (a real resize to 64), for the
   record: there decode_all cannot skip PIL's no-op convert and fit.
2. training step time from the uint8 store (memory-mapped, rows mapped to [-1, 1] per batch)
   against the same images as an in-memory float tensor: a DCGAN at 64x64, batch 64, one thread,
   the two legs interleaved. Target: within 1.05x.
3. memory: a child process maps a `--big`-image and a `--small`-image 64x64 store and trains on
   each for `--steps` steps; its private anonymous memory (not file-backed pages: /proc/self/
   smaps_rollup, `Anonymous`) is read at the end. Target: big within 100 MB of small.
Figures come from one run on this machine; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_pngs(root: Path, n: int, side: int = 64) -> list[str]:
    from PIL import Image

    from pipeline.core.datasets import shapes

    names = []
    for lo in range(0, n, 2000):
        x, y = shapes.draw(min(2000, n - lo), side, seed=lo)
        for i, img in enumerate(x):
            path = root / f"{(lo + i) % 10}" / f"{lo + i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(path)
            names.append(str(path))
    return sorted(names)


def plain_loop(names: list[str], side: int) -> np.ndarray:
    from PIL import Image, ImageOps

    out = np.zeros((len(names), 3, side, side), np.uint8)
    for i, name in enumerate(names):
        with Image.open(name) as img:
            img = ImageOps.fit(img.convert("RGB"), (side, side), Image.Resampling.BICUBIC)
            out[i] = np.asarray(img).transpose(2, 0, 1)
    return out


def bench_prepare(files: int, source_side: int = 64) -> dict:
    from pipeline.core.datasets import imagefolder

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        names = write_pngs(Path(d), files, source_side)
        print(f"[prepare] wrote {files} PNGs in {time.perf_counter() - t:.0f} s", flush=True)
        plain_loop(names[:500], 64)  # warm the page cache and PIL
        t = time.perf_counter()
        ref = plain_loop(names, 64)
        plain = time.perf_counter() - t
        t = time.perf_counter()  # as prepare runs it: into a memory-mapped file, which the workers write
        out = np.lib.format.open_memmap(Path(d) / "decoded.npy", "w+", np.uint8, (len(names), 3, 64, 64))
        ours, bad = imagefolder.decode_all(names, 64, 3, out=out)
        par = time.perf_counter() - t
    assert not bad and np.array_equal(ours, ref), "parallel decoding must give the plain loop's pixels"
    out = {"files": files, "source_side": source_side, "plain_s": plain, "parallel_s": par}
    out |= {"speedup": plain / par, "cores": os.cpu_count()}
    print(
        f"[prepare] {source_side}x{source_side} PNGs to 64x64: plain PIL loop {files / plain:.0f} img/s, "
        f"decode_all {files / par:.0f} img/s on "
        f"{os.cpu_count()} cores: {plain / par:.2f}x (target >= 1.6x)",
        flush=True,
    )
    return out


def _cfg(steps: int):
    from pipeline.core.config import build_config

    return build_config(
        {
            "data": {"name": "shapes", "resolution": 64},
            "model": {"arch": "dcgan", "z_dim": 64, "hidden": 32},
            "train": {"steps": steps, "batch_size": 64, "log_every": 100, "checkpoint_every": 10**9, "ema": 0.0},
            "eval": {"every": 0},
        }
    )


def make_store(path: Path, n: int, side: int = 64) -> np.ndarray:
    """An n-image uint8 store (random pixels: the step and the memory do not depend on content)."""
    x = np.lib.format.open_memmap(path, "w+", np.uint8, (n, 3, side, side))
    rng = np.random.default_rng(0)
    for lo in range(0, n, 4096):
        x[lo : lo + 4096] = rng.integers(0, 256, (min(4096, n - lo), 3, side, side), np.uint8)
    x.flush()
    return np.load(path, mmap_mode="c")


def steps_per_s(x, steps: int) -> float:

    from pipeline.core import training

    cfg = _cfg(steps)
    gan = training.build_gan(cfg, list(x.shape[1:]))
    batches = training.Batches(x, 64, 64, 0)
    t = time.perf_counter()
    training.train(gan, cfg, batches, training.Hooks())
    return steps / (time.perf_counter() - t)


def bench_step(steps: int) -> dict:
    import torch

    from pipeline.core import data

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        store = make_store(Path(d) / "x.npy", 10_000)
        floats = torch.from_numpy(data.to_unit(np.asarray(store)))
        mapped = torch.from_numpy(store)
        rates = {"store": [], "memory": []}
        for _ in range(3):  # interleaved legs
            rates["store"].append(steps_per_s(mapped, steps))
            rates["memory"].append(steps_per_s(floats, steps))
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["memory"] / best["store"]
    print(
        f"[step] DCGAN 64x64 batch 64, 1 thread: store {1000 / best['store']:.1f} ms/step, in-memory floats "
        f"{1000 / best['memory']:.1f} ms/step: {ratio:.3f}x (target <= 1.05x)",
        flush=True,
    )
    return {"ms_store": 1000 / best["store"], "ms_memory": 1000 / best["memory"], "ratio": ratio}


CHILD = """
import sys, json, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from benchmarks.bench_store import steps_per_s
x = np.load({path!r}, mmap_mode="c")
steps_per_s(torch.from_numpy(x), {steps})
fields = dict(l.split(":", 1) for l in open("/proc/self/smaps_rollup").read().splitlines()[1:])
kb = lambda k: int(fields[k].split()[0])
print(json.dumps({{"anonymous_mb": kb("Anonymous") / 1024, "rss_mb": kb("Rss") / 1024}}))
"""


def bench_memory(big: int, small: int, steps: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (small, big):
            path = Path(d) / f"x{n}.npy"
            make_store(path, n)
            code = CHILD.format(root=str(ROOT), path=str(path), steps=steps)
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            out[n] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"[memory] {n} images ({path.stat().st_size / 2**30:.2f} GiB store): {out[n]}", flush=True)
            path.unlink()
    diff = out[big]["anonymous_mb"] - out[small]["anonymous_mb"]
    print(f"[memory] private memory, {big} vs {small} images: {diff:+.1f} MB (target within 100 MB)", flush=True)
    return {"per_size": out, "difference_mb": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--big", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", choices=("prepare", "step", "memory"), default=None, help="run this leg alone")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    legs = {
        "prepare": lambda: bench_prepare(a.files),
        "prepare_resize": lambda: bench_prepare(a.files, 128),
        "step": lambda: bench_step(a.steps),
        "memory": lambda: bench_memory(a.big, a.small, a.steps),
    }
    figures = {k: leg() for k, leg in legs.items() if a.only is None or k.startswith(a.only)}
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
