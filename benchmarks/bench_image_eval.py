"""The image-evaluation core on real data: extractor accuracy and training time, the real-vs-real floor
of every metric, and the time to score 10,000 samples. Not a test.

    python benchmarks/bench_image_eval.py [--data mnist5k|digits] [--threads 2] [--extractor PATH]
                                          [--generator models/generator.pt] [--n 10000]

With `--extractor PATH` the extractor is loaded from PATH when it exists, else trained and saved
there. The 'generated' sets for the timing are the training images, each shifted by up to one pixel
and repeated up to n (nearly real on 28x28; on 8x8 digits a pixel is an eighth of the image), and
uniform noise images (nothing real). With `--generator`
the generator's n samples are scored against the training split, plus the label accuracy of
conditional generators. Timings on a shared machine swing with its load: CPU seconds are printed too.
One thread by default: on a busy 2-core machine two threads spin-wait on each other and ran the
MNIST-5k training ten times slower (see tests/unit/conftest.py); on a quiet one, --threads 2 helps.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.core import data, features, metrics_image
from pipeline.core.config import DataConfig


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> str:
    return f"{time.perf_counter() - t[0]:.1f} s wall, {time.process_time() - t[1]:.1f} s CPU"


def show(name: str, m: dict) -> None:
    print(f"  {name:22s} " + "  ".join(f"{k} {v:.4g}" for k, v in m.items()), flush=True)


def get_extractor(p: data.Prepared, path: str | None, seed: int):
    if path and Path(path).is_file():
        model, info = features.load_extractor(path)
        print(f"extractor: loaded {path} (trained in {info['seconds']:.1f} s)")
        return model, info
    t = clock()
    k = p.manifest["classes"]
    model, info = features.train_extractor(p.x_train, p.y_train, k, seed, x_val=p.x_val, y_val=p.y_val)
    print(f"extractor: trained {info['epochs']} epochs on {info['n_train']} images in {since(t)}")
    if path:
        features.save_extractor(model, info, path)
    return model, info


def score(name: str, model, real, x: np.ndarray, k: int, seed: int) -> dict:
    t = clock()
    fake = features.embed(model, x)
    m = metrics_image.image_metrics(*real, *fake, k, seed)
    show(f"{name} ({len(x)})", m)
    print(f"  {'':22s} embedding + all metrics: {since(t)}", flush=True)
    return {"probs": fake[1], **m}


def shifted_copies(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    reps = np.resize(np.arange(len(x)), n)
    g = torch.Generator().manual_seed(seed)
    return features.random_shift(torch.from_numpy(x[reps]), 1, g).numpy()


def score_generator(path: str, model, real, k: int, n: int, seed: int) -> None:
    from pipeline.core.training import sample, sample_labels
    from pipeline.io.outputs import load_generator

    G, spec = load_generator(path)
    if tuple(spec["sample_shape"]) != model.shape:
        raise SystemExit(f"{path}: makes samples of shape {spec['sample_shape']}, the data are {list(model.shape)}")
    t = clock()
    x = sample(G, n, spec["z_dim"], seed, num_classes=spec.get("num_classes"))
    print(f"generator {path}: {n} samples in {since(t)}")
    m = score("generator", model, real, x, k, seed)
    if spec.get("num_classes"):
        labels = sample_labels(n, spec["num_classes"]).numpy()
        print(f"  label accuracy {metrics_image.label_accuracy(m['probs'], labels):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist5k", choices=["mnist5k", "digits"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--extractor", default=None)
    ap.add_argument("--generator", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    p = data.prepare(DataConfig(name=args.data, val_fraction=0.1), args.seed)
    k = p.manifest["classes"]
    with threadpool_limits(args.threads):
        model, info = get_extractor(p, args.extractor, args.seed)
        print(f"  held-out accuracy {info['val_accuracy']:.4f} ({info['n_val']} images)")
        real = features.embed(model, p.x_train)
        print(f"metrics against the {len(p.x_train)} training images:")
        score("floor: held-out real", model, real, p.x_val, k, args.seed)
        score("shifted real", model, real, shifted_copies(p.x_train, args.n, args.seed), k, args.seed)
        noise = np.random.default_rng(args.seed).uniform(-1, 1, (args.n, *p.x_train.shape[1:])).astype(np.float32)
        score("uniform noise", model, real, noise, k, args.seed)
        if args.generator:
            score_generator(args.generator, model, real, k, args.n, args.seed)


if __name__ == "__main__":
    main()
