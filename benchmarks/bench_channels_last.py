"""`train.channels_last` on a CPU: the training step of an image preset in both memory formats. Not a test.

    python benchmarks/bench_channels_last.py [--preset shapes32] [--steps 20] [--rounds 4]

Builds the preset's GAN twice (same seed, same data: 2,048 of the built-in shapes images at the
preset's resolution and channels, in memory; a step's cost depends on the data's shape, not its
content), one in PyTorch's default NCHW format and one with `train.channels_last: true`, and times
the real training loop (`pipeline.core.training.train`: every loss, norm and EMA update of the
preset) with one torch thread, as a Ray worker runs it. The two alternate in rounds of `--steps` steps, so a machine that is
busier in one minute than the next slows both alike; prints seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.core import training
from pipeline.core.config import build_config, deep_merge, read_yaml
from pipeline.core.datasets import shapes

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="shapes32")
    ap.add_argument("--steps", type=int, default=20, help="steps a round, per format")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    raw = deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / f"presets/{args.preset}.yaml"))
    base = build_config(raw)
    side, channels = base.data.resolution or 32, base.data.channels or 3
    images, labels = shapes.draw(2048, side, seed=0, channels=channels)
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    y = torch.from_numpy(labels)
    runs = {}
    for cl in (False, True):
        cfg = build_config(deep_merge(raw, {"train": {"channels_last": cl}}))
        k = shapes.NUM_CLASSES if cfg.model.conditional else None
        gan = training.build_gan(cfg, list(x.shape[1:]), "cpu", k)
        batches = training.Batches(
            x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, y=y, num_classes=k or 0, channels_last=cl
        )
        timed = deep_merge(raw, {"train": {"channels_last": cl, "log_every": 10**9}})
        runs[cl] = {"raw": timed, "gan": gan, "batches": batches, "seconds": 0.0}
    done = 0
    for r in range(args.rounds + 1):  # round 0 warms both up and is not timed
        done += args.steps
        for run in runs.values():
            cfg = build_config(deep_merge(run["raw"], {"train": {"steps": done}}))
            t0 = time.perf_counter()
            training.train(run["gan"], cfg, run["batches"])
            if r:
                run["seconds"] += time.perf_counter() - t0
    n = args.rounds * args.steps
    nchw, cl = runs[False]["seconds"] / n, runs[True]["seconds"] / n
    print(
        f"{args.preset} ({base.model.arch}, hidden {base.model.hidden}, batch {base.train.batch_size}, {side}x{side}, "
        f"one thread, {n} timed steps each): NCHW {nchw:.3f} s/step, channels_last {cl:.3f} s/step: "
        f"{nchw / cl:.2f}x faster"
    )


if __name__ == "__main__":
    main()
