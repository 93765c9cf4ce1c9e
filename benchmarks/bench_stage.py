"""The whole train stage against the bare loop (issue #17): where the stage's time goes. Not a test.

    python benchmarks/bench_stage.py [--preset grid] [--steps 10000]

In a fresh git + DVC copy of the project (the preset applied, nothing to resume or hand back),
`dvc repro features` runs first, untimed (prepare and the feature extractor). Then the train stage's
own command (dvc.yaml's `cmd`, as `dvc repro` runs it) is timed from process start to exit, each
line of its output stamped with the time it came, which splits the wall time into: start-up (Python
imports and the local Ray), the MLflow run (a fresh SQLite store), the Ray Train controller and
worker start, the steps (with the live evaluations, checkpoints and metric logging between them) and
the end (final outputs, samples, artifacts, shutdown). Then, in this process, the bare loop: the same
model, data and steps through `training.train` with no hooks, on one torch thread (what a Ray Train CPU
worker runs on), and Ray Train's own floor: a one-worker TorchTrainer fit() of a loop that does nothing. Target (#17): the stage within 1.25x of the bare loop for the default run.
Figures come from one run on this machine; the ratio is what compares.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STEP = re.compile(r"^\[train\] step (\d+)/(\d+)")


def timed_stage(proj: Path) -> list[tuple[float, str]]:
    """Run the train stage's command in `proj`; (seconds since start, line) for every output line."""
    import yaml

    cmd = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]["train"]["cmd"].split()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"PYTHONPATH": str(proj), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - t0, line.rstrip()) for line in p.stdout]
    lines.append((time.perf_counter() - t0, f"exit {p.wait()}"))
    if p.returncode:
        sys.exit("the train stage failed:\n" + "\n".join(line for _, line in lines[-30:]))
    return lines


def first(lines: list[tuple[float, str]], prefix: str) -> float:
    return next(t for t, line in lines if line.startswith(prefix))


def phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """The stage's wall time split at the lines that mark each phase's end."""
    steps = [(t, int(m[1])) for t, line in lines if (m := STEP.match(line))]
    ray_up = first(lines, "[train] started local Ray")
    mlflow = first(lines, "[train] MLflow run")
    workers = next(t for t, line in lines if re.match(r"^\[train\] \d+ worker\(s\) on", line))
    last_step, end = steps[-1][0], lines[-1][0]
    # a live evaluation lengthens the gap that ends at its step: the median gap with one, less without
    evals = {int(m[1]) for _, line in lines if (m := re.match(r"^\[train\] eval at step (\d+)", line))}
    gaps = [(b[1] in evals, b[0] - a[0]) for a, b in zip(steps, steps[1:])]
    plain = statistics.median([g for e, g in gaps if not e] or [0.0])
    with_eval = [g for e, g in gaps if e]
    return {
        "start-up (imports, local Ray)": ray_up,
        "MLflow run (SQLite store)": mlflow - ray_up,
        "Ray Train start (controller, worker, process group)": workers - mlflow,
        "steps (with evaluations, checkpoints, logging)": last_step - workers,
        "  of which live evaluations (estimated)": sum(g - plain for g in with_eval),
        "end (outputs, samples, artifacts, shutdown)": end - last_step,
        "total": end,
    }


def bare_loop(proj: Path, steps: int) -> float:
    """Seconds for `steps` steps of the stage's model through training.train, no hooks, one thread."""
    import torch

    from pipeline.core import data, training
    from pipeline.core.config import load_config

    cfg = load_config(proj / "params.yaml", {"train.steps": steps})
    prepared = data.load_prepared(proj / "data/prepared")
    torch.set_num_threads(1)
    gan = training.build_gan(cfg, list(prepared.x_train.shape[1:]))
    x = torch.as_tensor(prepared.x_train)
    batches = training.Batches(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed)
    t = time.perf_counter()
    training.train(gan, cfg, batches)
    return time.perf_counter() - t


def ray_train_floor(storage: Path) -> tuple[float, float]:
    """Ray Train's own fixed cost on this machine: (seconds from fit() to a no-op loop's first line,
    seconds for the whole fit()) of one CPU worker, on a local Ray started as the stage starts it."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray import distributed

    def noop_loop(config: dict) -> None:  # (defined here: Ray sends it by value to a worker without this module)
        import time
        from pathlib import Path

        Path(config["stamp"]).write_text(str(time.time()))  # (Ray Train V2 keeps no metrics without a checkpoint)

    stamp = storage / "entered"
    storage.mkdir(parents=True, exist_ok=True)
    distributed.ensure_ray(None, 2)
    try:
        trainer = TorchTrainer(
            noop_loop,
            train_loop_config={"stamp": str(stamp)},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="noop", storage_path=str(storage)),
        )
        t = time.time()
        trainer.fit()
        return float(stamp.read_text()) - t, time.time() - t
    finally:
        ray.shutdown()


def main() -> None:
    from bench_pipeline_seeds import fresh_repo, sh

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="grid")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: the preset's)")
    ap.add_argument("--show", action="store_true", help="print the stage's time-stamped output")
    a = ap.parse_args()
    proj = fresh_repo(a.preset, [])
    if a.steps:
        import yaml

        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["train"]["steps"] = a.steps
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(proj, "dvc", "repro", "features")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"{a.preset}: {proj}; code of {commit.stdout.strip()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    lines = timed_stage(proj)
    if a.show:
        print("\n".join(f"{t:8.2f} {line}" for t, line in lines))
    split = phases(lines)
    steps = int(STEP.match(next(line for _, line in reversed(lines) if STEP.match(line)))[1])
    bare = bare_loop(proj, steps)
    width = max(map(len, split))
    for k, v in split.items():
        print(f"{k:<{width}}  {v:7.1f} s")
    per_step = split["steps (with evaluations, checkpoints, logging)"] / steps
    print(f"{'bare loop (training.train, no hooks, 1 thread)':<{width}}  {bare:7.1f} s")
    print(
        f"step in the stage / bare step: {per_step * 1e3:.2f} / {bare / steps * 1e3:.2f} ms = {per_step * steps / bare:.3f}"
    )
    ratio = split["total"] / bare
    print(f"stage / bare loop: {ratio:.2f}x (target <= 1.25x)")
    entered, whole = ray_train_floor(proj / ".ganpipe/noop")
    print(
        f"Ray Train's own floor (one worker, a no-op loop): {entered:.1f} s from fit() to the loop, "
        f"{whole:.1f} s the whole fit()"
    )
    floor = {"noop_fit_to_loop_s": entered, "noop_fit_s": whole}
    print(json.dumps({"steps": steps, "bare_s": bare, "ratio": ratio, **split, **floor}))


if __name__ == "__main__":
    main()
