"""Tune benchmark: per-trial overhead, a 32-trial ASHA sweep on the 2D grid, and ASHA's compute saving
over running every trial to the end (the same 32 seeded configurations). Not a test.

    python benchmarks/bench_tune.py [--trials 32] [--steps 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline import data, distributed, live_eval, tracking, tune
from pipeline.config import build_config, deep_merge, read_yaml

SPACE = {"train.lr_g": {"loguniform": [1e-4, 3e-3]}, "train.lr_d": {"loguniform": [1e-4, 3e-3]}}


def sweep(raw: dict, root: Path, name: str):
    cfg = build_config(raw)
    parsed = tune.parse_space(cfg.tune.search_space, raw)
    prepared = data.prepare(cfg.data, cfg.seed)
    uri = tracking.resolve_uri(None, env={}, cwd=root)
    parent, _ = tracking.start_or_resume_run(uri, "bench-tune", name, name)
    job = tune.SweepJob(
        raw,
        list(parsed),
        prepared.x_train,
        live_eval.from_prepared(cfg, prepared, None),
        uri,
        tracking.experiment_id(uri, "bench-tune"),
        parent,
    )
    t0 = time.perf_counter()
    results = tune.run_sweep(cfg, parsed, job, str(root / "ray"), None, name)
    wall = time.perf_counter() - t0
    rows = tune.summarise(results, list(parsed), cfg)
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--overhead-only", action="store_true")
    args = ap.parse_args()
    distributed.ensure_ray(None, 2)
    root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    base = deep_merge(
        read_yaml("params.yaml"),
        {
            "train": {"steps": args.steps, "checkpoint_every": args.steps // 6, "log_every": args.steps // 6},
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
    wall, _ = sweep(tiny, root, "overhead")
    overhead = wall / (8 / 2)
    if args.overhead_only:
        print(f"per-trial overhead (start to first report, 1-step trials): {overhead:.2f} s  (target < 2 s)")
        return

    asha_wall, asha = sweep(deep_merge(base, {"tune": {"scheduler": "asha"}}), root, "asha")
    fifo_wall, fifo = sweep(deep_merge(base, {"tune": {"scheduler": "none"}}), root, "fifo")
    steps = lambda rows: sum(r["step"] or 0 for r in rows)
    best = lambda rows: tune.best_row(rows, "w1", "min")
    ba, bf = best(asha), best(fifo)
    print(f"per-trial overhead (start to first report, 1-step trials): {overhead:.2f} s  (target < 2 s)")
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


if __name__ == "__main__":
    main()
