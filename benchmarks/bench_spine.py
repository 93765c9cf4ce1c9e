"""Spine benchmark: Ray Train overhead per step, Ray start-up, no-op `dvc repro`. Not a test.

    python benchmarks/bench_spine.py [--steps 3000]

Run from the repository root after `dvc repro` (the no-op repro is timed on this checkout).
Figures come from one run on this machine; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.core import data, training
from pipeline.core.config import load_config
from pipeline.io import tracking
from pipeline.ray import distributed
from pipeline.ray.runtime import WorkerData


def step_times(history: list[dict]) -> list[float]:
    return [h["time/step_s"] for h in history[1:]]  # the first tick holds warm-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    cfg = load_config(
        args.params,
        {
            "train.steps": args.steps,
            "train.log_every": 200,
            "train.checkpoint_every": args.steps,
            "storage.root": "/tmp/ganpipe-bench/ray",
            "tracking.experiment": "ganpipe-bench",
        },
    )
    prepared = data.prepare(cfg.data, cfg.seed)

    t0 = time.perf_counter()
    distributed.ensure_ray(None, cfg.ray.num_cpus)
    ray_start = time.perf_counter() - t0

    # Ray Train worker (1 worker, MLflow logging on, as the train stage runs it)
    uri = tracking.resolve_uri(None, cwd="/tmp/ganpipe-bench")
    name = f"bench-{int(time.time())}"
    run_id, _ = tracking.start_or_resume_run(uri, "ganpipe-bench", name, name)
    t0 = time.perf_counter()
    state, _ = distributed.fit(cfg, WorkerData.ship(prepared.x_train), tracking_uri=uri, run_id=run_id, name=name)
    ray_fit_wall = time.perf_counter() - t0
    ray_step = statistics.median(step_times(state["history"]))
    threads = 1  # a Ray Train CPU worker holds 1 CPU and runs torch on 1 thread (the train stage prints it)

    # bare PyTorch loop: the same model, batch, loop and thread count, no Ray, no MLflow
    torch.set_num_threads(int(threads))
    gan = training.build_gan(cfg, list(prepared.x_train.shape[1:]))
    batches = training.Batches(torch.from_numpy(prepared.x_train), cfg.train.batch_size, cfg.model.z_dim, cfg.seed)
    training.train(gan, cfg, batches)
    bare_step = statistics.median(step_times(gan.history))

    # mlflow.set_tracking_uri() exported MLFLOW_TRACKING_URI (the bench store): not for the repo's pipeline
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run(["dvc", "repro", "-q"], check=False, capture_output=True, env=env)
    t0 = time.perf_counter()
    noop = subprocess.run(["dvc", "repro"], capture_output=True, text=True, env=env)
    dvc_noop = time.perf_counter() - t0
    up_to_date = "Running stage" not in noop.stdout

    print(
        f"model {cfg.model.arch} hidden {cfg.model.hidden}, batch {cfg.train.batch_size}, {args.steps} steps, "
        f"torch threads {threads}"
    )
    print(f"step time, bare PyTorch loop:      {bare_step * 1e3:.3f} ms")
    print(f"step time, inside Ray Train worker: {ray_step * 1e3:.3f} ms")
    print(f"ratio Ray / bare:                   {ray_step / bare_step:.3f}  (target <= 1.05)")
    print(f"Ray start-up (ray.init):            {ray_start:.2f} s")
    print(
        f"Ray Train fit wall time:            {ray_fit_wall:.2f} s  (of which training {ray_step * args.steps:.2f} s)"
    )
    print(
        f"no-op dvc repro:                    {dvc_noop:.2f} s  (target < 2 s){'' if up_to_date else '  [pipeline was not up to date]'}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
