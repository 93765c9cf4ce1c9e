"""Tune benchmark: per-trial overhead, a 32-trial ASHA sweep on the 2D grid, and ASHA's compute saving
over running every trial to the end (the same 32 seeded configurations). Not a test.

    python benchmarks/bench_tune.py [--trials 32] [--steps 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.core import data, live_eval
from pipeline.core.config import build_config, deep_merge, read_yaml
from pipeline.io import tracking
from pipeline.ray import distributed, tune
from pipeline.ray.runtime import WorkerData

SPACE = {"train.lr_g": {"loguniform": [1e-4, 3e-3]}, "train.lr_d": {"loguniform": [1e-4, 3e-3]}}


def trial_timer():
    """A Tune callback: seconds from each trial's start (as the driver sees it) to its first report."""
    from ray.tune import Callback

    class Timer(Callback):
        def __init__(self):
            self.started: dict[str, float] = {}
            self.first: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id not in self.first:
                self.first[trial.trial_id] = time.perf_counter() - self.started[trial.trial_id]

    return Timer()


def sweep(raw: dict, root: Path, name: str, callbacks=None):
    cfg = build_config(raw)
    parsed = tune.parse_space(cfg.tune.search_space, raw)
    prepared = data.prepare(cfg.data, cfg.seed)
    uri = tracking.resolve_uri(None, env={}, cwd=root)
    parent, _ = tracking.start_or_resume_run(uri, "bench-tune", name, name)
    job = tune.SweepJob(
        base_raw=raw,
        keys=list(parsed),
        data=WorkerData.ship(prepared.x_train),
        live=live_eval.from_prepared(cfg, prepared, None),
        tracking_uri=uri,
        experiment_id=tracking.experiment_id(uri, "bench-tune"),
        parent_run_id=parent,
    )
    t0 = time.perf_counter()
    results = tune.run_sweep(cfg, parsed, job, str(root / "ray"), None, name, callbacks)
    wall = time.perf_counter() - t0
    rows = tune.summarise(results, list(parsed), cfg)
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10000, help="steps per trial (the default pipeline trains 10,000)")
    ap.add_argument("--overhead-only", action="store_true")
    args = ap.parse_args()
    distributed.ensure_ray(None, 2)
    root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    base = deep_merge(
        read_yaml("params.yaml"),
        {
            "train": {"steps": args.steps, "checkpoint_every": args.steps // 10, "log_every": args.steps // 10},
            "tune": {
                "num_samples": args.trials,
                "max_concurrent": 2,
                "metric": "w1",
                "mode": "min",
                "search_space": SPACE,
            },
        },
    )

    # overhead: trials of one step each, 2 at a time: wall per trial ~ start-up + one report
    tiny = deep_merge(
        base,
        {"train": {"steps": 1, "checkpoint_every": 1, "log_every": 1}, "tune": {"num_samples": 8, "scheduler": "none"}},
    )
    timer = trial_timer()
    wall, _ = sweep(tiny, root, "overhead", [timer])
    firsts = list(timer.first.values())  # in start order: the first two start cold actors
    overhead = (
        f"per-trial overhead, trial start to first report (1-step trials, {len(firsts)} trials): "
        f"median {statistics.median(firsts):.2f} s, warm actors {statistics.median(firsts[2:]):.2f} s, "
        f"cold actors {max(firsts[:2]):.2f} s  (target < 2 s); sweep wall per trial {wall / len(firsts):.2f} s"
    )
    print(overhead, flush=True)
    if args.overhead_only:
        return

    asha_wall, asha = sweep(deep_merge(base, {"tune": {"scheduler": "asha"}}), root, "asha")
    fifo_wall, fifo = sweep(deep_merge(base, {"tune": {"scheduler": "none"}}), root, "fifo")
    steps = lambda rows: sum(r["step"] or 0 for r in rows)
    best = lambda rows: tune.best_row(rows, "w1", "min")
    ba, bf = best(asha), best(fifo)
    print(overhead)
    print(f"ASHA sweep, {args.trials} trials x {args.steps} steps: {asha_wall:.0f} s wall, {steps(asha)} steps trained")
    print(f"every trial to the end:            {fifo_wall:.0f} s wall, {steps(fifo)} steps trained")
    print(
        f"ASHA compute saving: {1 - steps(asha) / steps(fifo):.0%} of steps, {1 - asha_wall / fifo_wall:.0%} of wall time"
    )
    for name, b in (("ASHA", ba), ("full", bf)):
        print(
            f"best {name}: w1={b['w1']:.3f} modes={b['modes']} hq={100 * b['hq_fraction']:.1f}% "
            f"rkl={b['reverse_kl']:.3f} lr_g={b['train.lr_g']:.2g} lr_d={b['train.lr_d']:.2g}"
        )
    good = lambda rows: sum(1 for r in rows if r["modes"] == 25 and r["hq_fraction"] >= 0.95)
    print(
        f"trials with all 25 modes and >= 95% high quality (target: at least one): "
        f"ASHA {good(asha)}/{len(asha)}, full {good(fifo)}/{len(fifo)}"
    )


if __name__ == "__main__":
    main()
