"""Distributed training benchmark: steps/s for 1 and 2 Ray Train workers (CPU, gloo), checkpoint save
and load times, and the per-step overhead of the Ray loop over the same loop without Ray. Not a test.

    python benchmarks/bench_distributed.py [--steps 2000]

The global batch is the same for 1 and 2 workers (each of 2 workers computes half), so the ratio
shows what data parallelism buys on this machine (on 2 cores, little: each worker holds 1 CPU).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch

from pipeline.core import data, training
from pipeline.core.config import load_config
from pipeline.io import tracking
from pipeline.ray import distributed
from pipeline.ray.runtime import WorkerData


def median_step(history: list[dict]) -> float:
    return statistics.median(h["time/step_s"] for h in history[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    base = {
        "train.steps": args.steps,
        "train.log_every": 200,
        "train.checkpoint_every": args.steps,
        "storage.root": "/tmp/ganpipe-bench/ray",
        "tracking.experiment": "ganpipe-bench",
    }
    distributed.ensure_ray(None, 2)
    uri = tracking.resolve_uri(None, env={}, cwd="/tmp/ganpipe-bench")
    per_step = {}
    for n in (1, 2):
        cfg = load_config(args.params, {**base, "train.num_workers": n})
        prepared = data.prepare(cfg.data, cfg.seed)
        name = f"bench-{n}w-{int(time.time())}"
        run_id, _ = tracking.start_or_resume_run(uri, "ganpipe-bench", name, name)
        state, _ = distributed.fit(cfg, WorkerData.ship(prepared.x_train), tracking_uri=uri, run_id=run_id, name=name)
        per_step[n] = median_step(state["history"])

    cfg = load_config(args.params, {**base, "train.num_workers": 1})
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker
    gan = training.build_gan(cfg, list(prepared.x_train.shape[1:]))
    batches = training.Batches(torch.from_numpy(prepared.x_train), cfg.train.batch_size, cfg.model.z_dim, cfg.seed)
    training.train(gan, cfg, batches)
    bare = median_step(gan.history)

    buf = io.BytesIO()
    t0 = time.perf_counter()
    for _ in range(20):
        buf.seek(0)
        torch.save(training.gan_state(gan), buf)
    save = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        buf.seek(0)
        training.load_gan_state(gan, torch.load(buf, weights_only=False), cfg)
    load = (time.perf_counter() - t0) / 20

    print(f"model {cfg.model.arch} hidden {cfg.model.hidden}, global batch {cfg.train.batch_size}, {args.steps} steps")
    print(f"1 worker:  {1 / per_step[1]:8.1f} steps/s")
    print(f"2 workers: {1 / per_step[2]:8.1f} steps/s   (ratio 2w/1w {per_step[1] / per_step[2]:.2f})")
    print(
        f"bare loop: {1 / bare:8.1f} steps/s   (Ray 1-worker overhead per step: {per_step[1] / bare:.3f}, target <= 1.05)"
    )
    print(f"checkpoint state {buf.tell() / 1e6:.2f} MB: save {save * 1e3:.1f} ms, load {load * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
