"""What each ingredient of the 2D recipes contributes, seed by seed. Not a test.

    python benchmarks/bench_ingredients.py [--recipes plain default ...] [--seeds 0,1,2,3,4]

Each recipe is params.yaml, a preset and overrides, trained in this process exactly as the train
stage trains it (the same data, draws and loop, one thread) and scored as the evaluate stage scores
it (2,500 samples of the EMA generator at seed + 1: modes, high quality, reverse KL). The figures
equal the pipeline's: the default recipe's seed 0 gives the committed metrics/eval.json bit for bit.
A quality claim is still measured through `dvc repro` (benchmarks/bench_pipeline_seeds.py); this
script says which ingredient moved it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core import data, metrics2d, training
from pipeline.core.config import build_config, deep_merge, read_yaml, unflatten

ROOT = Path(__file__).resolve().parents[1]

# name: (preset or None, overrides as dotted keys)
RECIPES: dict[str, tuple[str | None, dict]] = {
    "plain": (None, {"loss.r1_gamma": 0.0}),  # the default before R1: non-saturating, EMA 0.999
    "default": (None, {}),  # + R1 0.1
    "default-no-ema": (None, {"train.ema": 0.0}),
    "default+betas+decay": (None, {"train.betas": [0.0, 0.9], "train.lr_decay": 0.9}),
    "grid-best": ("grid-best", {}),  # R1, betas (0, 0.9), lr_decay 0.9, 20k steps
    "grid-best-no-r1": ("grid-best", {"loss.r1_gamma": 0.0}),
    "grid-best-no-decay": ("grid-best", {"train.lr_decay": 0.0}),
    "grid-best-no-betas": ("grid-best", {"train.betas": [0.5, 0.999]}),
    "ring": ("ring", {}),  # R1 0.1, 10k steps
    "ring-no-r1": ("ring", {"loss.r1_gamma": 0.0}),
    "ring-best": ("ring-best", {}),  # R1, betas (0, 0.9), lr_decay 0.9, 20k steps
    "ring-best-10k": ("ring-best", {"train.steps": 10000}),
    "ring-best-decay99": ("ring-best", {"train.lr_decay": 0.99}),
    "ring-best-ema9995": ("ring-best", {"train.ema": 0.9995}),
    "ring-best-b512": ("ring-best", {"train.batch_size": 512}),
    "ring-best-30k": ("ring-best", {"train.steps": 30000}),
    "ring-best-ncritic2": ("ring-best", {"train.n_critic": 2}),
    "ring-best-wide": ("ring-best", {"model.hidden": 256}),
}


def run(preset: str | None, overrides: dict, seed: int) -> dict:
    raw = read_yaml(ROOT / "params.yaml")
    if preset:
        raw = deep_merge(raw, read_yaml(ROOT / "presets" / f"{preset}.yaml"))
    cfg = build_config(deep_merge(raw, unflatten({**overrides, "seed": seed})))
    torch.set_num_threads(cfg.train.cpus_per_worker)
    prepared = data.prepare(cfg.data, cfg.seed)
    x = torch.tensor(prepared.x_train)
    gan = training.build_gan(cfg, list(x.shape[1:]), "cpu", None)
    batches = training.Batches(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, heldout=torch.tensor(prepared.x_val))
    t0 = time.perf_counter()
    training.train(gan, cfg, batches)
    wall = time.perf_counter() - t0
    G = gan.G_ema if gan.G_ema is not None else gan.G
    samples = np.asarray(training.sample(G, 2500, cfg.model.z_dim, cfg.seed + 1))
    return {
        **metrics2d.mode_metrics(samples, data.mixture(cfg.data.name)),
        "verdict": gan.monitor.verdict,
        "train_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.recipes:
        preset, overrides = RECIPES[name]
        rows = []
        for seed in seeds:
            m = run(preset, overrides, seed)
            rows.append(m)
            print(
                f"{name} seed {seed}: modes {m['modes']}  hq {m['hq_fraction']:.4f}  reverse_kl {m['reverse_kl']:.4f}"
                f"  {m['verdict']}  {m['train_s']:.0f} s",
                flush=True,
            )
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("modes", "hq_fraction", "reverse_kl")}
        print(
            f"{name} mean: modes {mean['modes']:.1f}  hq {mean['hq_fraction']:.4f}  reverse_kl {mean['reverse_kl']:.4f}"
            f"  (min hq {min(r['hq_fraction'] for r in rows):.4f}, max reverse_kl "
            f"{max(r['reverse_kl'] for r in rows):.4f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
