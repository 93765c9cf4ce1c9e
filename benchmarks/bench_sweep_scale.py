"""Sweeps at scale (issue #18), through the command a user runs (`python stages/tune.py` in a throwaway
copy of the project), with real parts. Not a test: one run prints its figures (and a JSON line).

    python benchmarks/bench_sweep_scale.py single --trials 32   # one local Ray, SQLite MLflow store
    python benchmarks/bench_sweep_scale.py team --trials 256    # 2-node Ray, Postgres MLflow with auth, S3
    python benchmarks/bench_sweep_scale.py team --trials 256 --storage local   # the same, checkpoints on disk
    python benchmarks/bench_sweep_scale.py team --trials 64 --kill-node 32   # the worker node dies halfway
    python benchmarks/bench_sweep_scale.py kill --trials 64     # SIGKILL the driver halfway, resume
    python benchmarks/bench_sweep_scale.py pbt --trials 16      # PBT: mutated learning rates in the optimizers
    python benchmarks/bench_sweep_scale.py spread --trials 2    # 2-worker trials over the 2 nodes, S3 storage

`single` and `team` run the same search (Optuna TPE + ASHA over lr_g, lr_d; 300 steps a trial, a report
every 100; 2 trials at a time on 2 CPUs: one Ray node of 2, or two nodes of 1) and measure from MLflow:
every nested run present, each trial's reports once each (steps 100, 200, ... up to its last), the
registry untouched, the server's request rate (its access log), trial start to first report (the nested
run's start to its first metric) and sweep wall time per trial and per report. `kill` runs the sweep
twice (random search, no early stopping): once straight through, once with its driver SIGKILLed when
half the trials have ended and the same command run again; it compares the steps trained (each trial
reports `steps_since_restore`; the steps a killed process trained after its last report are lost and
not counted: at most 100 per running trial).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"train.lr_g": {"loguniform": [1e-4, 3e-3]}, "train.lr_d": {"loguniform": [1e-4, 3e-3]}}
STEPS, EVERY = 300, 100


def params(trials: int, **tune) -> dict:
    return {
        "tune": {"num_samples": trials, "max_concurrent": 2, "search_space": SPACE, **tune},
        "train": {"steps": STEPS, "checkpoint_every": EVERY, "log_every": 50, "ema": 0.0, "max_failures": 2},
    }


def drive(
    project: Path, extra_env: dict[str, str], kill_after: int | None = None, on_ended=None
) -> tuple[float, list[str]]:
    """Run the tune stage, echoing its progress lines; with `kill_after`, SIGKILL it (and its process
    group: the local Ray it started) once that many trials have ended; `on_ended(n)` is called as the
    n-th trial ends. Returns (wall s, output lines)."""
    from tests.integration.conftest import spawn, stop_group

    t0 = time.perf_counter()
    driver = spawn(project, sys.executable, "stages/tune.py", extra_env=extra_env)
    lines, ended = [], 0
    try:
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("[tune]"):
                print("   ", line.rstrip(), flush=True)
            if line.startswith("[tune] trial ") and " again " not in line:
                ended += 1
                if on_ended is not None:
                    on_ended(ended)
            if kill_after is not None and ended >= kill_after:
                os.killpg(driver.pid, signal.SIGKILL)
                break
        code = driver.wait()
    finally:
        stop_group(driver)
    if kill_after is None and code != 0:
        raise SystemExit(f"the sweep failed ({code}):\n{''.join(lines[-40:])}")
    return time.perf_counter() - t0, lines


def reports(project: Path, uri: str) -> dict:
    """What MLflow holds of the sweep, checked against tune/trials.csv."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ganpipe").experiment_id
    runs = client.search_runs([exp], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("ganpipe.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    with open(project / "tune/trials.csv") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    wrong, total, first = [], 0, []
    for c in children:
        history = client.get_metric_history(c.info.run_id, "w1")
        steps = sorted(m.step for m in history)
        last = int(float(rows[c.data.tags["ganpipe.trial_id"]]["step"]))
        if steps != list(range(EVERY, last + 1, EVERY)):
            wrong.append((c.data.tags["ganpipe.trial_id"], steps))
        total += len(steps)
        if history:
            first.append((min(m.timestamp for m in history) - c.info.start_time) / 1000)
    statuses = {s: sum(r["status"] == s for r in rows.values()) for s in {r["status"] for r in rows.values()}}
    return {
        "parents": len(parents),
        "nested_runs": len(children),
        "trials_csv": len(rows),
        "statuses": statuses,
        "reports": total,
        "trials_with_wrong_reports": len(wrong),
        "wrong_examples": wrong[:3],
        "registered_models": len(client.search_registered_models()),
        "nodes": len({c.data.tags.get("ganpipe.node") for c in children}),
        "first_report_s_median": statistics.median(first) if first else None,
        "first_report_s_p90": statistics.quantiles(first, n=10)[-1] if len(first) > 1 else None,
    }


def two_nodes(env: dict[str, str], nodes: list) -> str:
    """Start a Ray cluster of two raylets of one CPU each, their `ray start` given `env` (appended to
    `nodes`, for the caller to stop); returns its address."""
    from tests.integration.conftest import free_port, wait_for_port
    from tests.integration.test_tune_cluster import ray_node, wait_for_nodes

    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths are short
    nodes.append(
        ray_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}", extra_env=env)
    )
    wait_for_port(port)
    nodes.append(ray_node(f"--address={address}", extra_env=env))
    wait_for_nodes(address, 2)
    return address


def single(args, tmp: Path) -> dict:
    from tests.integration.conftest import TINY, make_project, set_params, sh

    project = make_project(tmp / "proj", TINY)
    set_params(project, params(args.trials, search_alg="optuna", scheduler="asha"))
    sh(project, sys.executable, "stages/prepare.py")
    wall, _ = drive(project, {})
    out = reports(project, f"sqlite:///{project / 'mlflow.db'}")
    return {"part": "single", "trials": args.trials, "wall_s": wall, **out}


def team(args, tmp: Path) -> dict:
    from pipeline.io.teamstack import auth_unavailable, start_postgres, start_stack
    from tests.integration.conftest import TINY, make_project, set_params, sh, stop_group

    uri, stop_pg = start_postgres(tmp / "pg")
    stack = start_stack(tmp / "stack", postgres_uri=uri, auth=auth_unavailable() is None)
    nodes = []
    try:
        env = stack.env()  # the team's exported settings, in each node's `ray start` too (trials run there)
        address = two_nodes(env, nodes)
        project = make_project(tmp / "proj", TINY)
        # the nodes share this machine's disk: `--storage local` takes S3 (moto) out of the measure
        storage = {"root": f"s3://{stack.bucket}/ganpipe/ray", "s3_endpoint_url": stack.s3_endpoint_url}
        if args.storage == "local":
            storage = {"root": str(tmp / "ray")}
        set_params(project, {**params(args.trials, search_alg="optuna", scheduler="asha"), "storage": storage})
        sh(project, sys.executable, "stages/prepare.py", extra_env=env)
        log, s3_log = stack.workdir / "mlflow.log", stack.workdir / "moto.log"
        before, s3_before = requests_in(log), requests_in(s3_log)

        def kill_node(ended: int) -> None:  # the worker node dies (its raylet and every trial on it)
            if ended == args.kill_node:
                os.killpg(nodes[1].pid, signal.SIGKILL)

        wall, lines = drive(project, {**env, "RAY_ADDRESS": address}, on_ended=kill_node)
        requests, s3_requests = requests_in(log) - before, requests_in(s3_log) - s3_before
        os.environ.update({k: v for k, v in env.items() if k.startswith("MLFLOW_TRACKING_")})
        out = reports(project, stack.tracking_uri)
        return {
            "part": "team",
            "trials": args.trials,
            "storage": args.storage,
            "wall_s": wall,
            "server_requests": requests,
            "requests_per_s": requests / wall,
            "node_killed_after_trials": args.kill_node,
            "trial_restarts": sum(" again " in line for line in lines),
            "s3_requests": s3_requests,  # all of moto's: Tune's snapshots and checkpoints, DVC's, MLflow's artifacts
            "backend": uri.split("://")[0],
            "auth": stack.auth,
            **out,
        }
    finally:
        for node in reversed(nodes):
            stop_group(node)
        stack.stop()
        stop_pg()


def spread(args, tmp: Path) -> dict:
    """Multi-worker trials (2 Ray Train workers of 1 CPU each) on the 2-node cluster of 1 CPU a node,
    storage on S3 (moto), MLflow server: each trial's workers can only run one on each node."""
    from pipeline.io.teamstack import start_stack
    from tests.integration.conftest import TINY, make_project, set_params, sh, stop_group

    stack = start_stack(tmp / "stack")
    nodes = []
    try:
        env = stack.env()
        address = two_nodes(env, nodes)
        project = make_project(tmp / "proj", TINY)
        set_params(
            project,
            {
                "tune": {
                    "num_samples": 1,
                    "scheduler": "none",
                    "max_concurrent": 1,
                    "search_space": {"train.lr_g": {"grid": [0.0005, 0.002][: max(1, min(args.trials, 2))]}},
                },
                "train": {"steps": 100, "checkpoint_every": 50, "num_workers": 2, "cpus_per_worker": 1},
                "storage": {"root": f"s3://{stack.bucket}/ganpipe/ray", "s3_endpoint_url": stack.s3_endpoint_url},
            },
        )
        sh(project, sys.executable, "stages/prepare.py", extra_env=env)
        wall, _ = drive(project, {**env, "RAY_ADDRESS": address})
        import ray

        # (Ray's state API, which would list the workers' nodes, needs the dashboard, off here) a 2-worker
        # trial that finished on nodes of one CPU each had one worker on each node
        ray.init(address=address, logging_level="ERROR")
        try:
            cpus = sorted(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
        finally:
            ray.shutdown()
        out = reports(project, stack.tracking_uri)
        return {
            "part": "spread",
            "wall_s": wall,
            "cpus_per_node": cpus,
            # (a multi-worker trial reports val/w1 every checkpoint_every: `reports`' check of w1 every 100
            # steps does not apply; tests/integration/test_tune.py checks those)
            **{k: out[k] for k in ("nested_runs", "statuses")},
        }
    finally:
        for node in reversed(nodes):
            stop_group(node)
        stack.stop()


def requests_in(log: Path) -> int:
    """HTTP requests a server answered so far (its access log lines: MLflow's uvicorn, moto's werkzeug)."""
    try:
        return sum('HTTP/1.1"' in line for line in log.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def trained_steps(project: Path) -> tuple[int, int]:
    """(steps trained, reports) over every trial's result.json (Tune appends across driver restarts):
    each process's last `steps_since_restore` summed."""
    steps = reports_ = 0
    for result in (project / ".ganpipe/ray").glob("ganpipe-tune-*/run_trial_*/result.json"):
        segment = 0
        for line in result.read_text().splitlines():
            r = json.loads(line)
            reports_ += 1
            if r["iterations_since_restore"] == 1:
                steps += segment
            segment = r["steps_since_restore"]
        steps += segment
    return steps, reports_


def kill(args, tmp: Path) -> dict:
    from tests.integration.conftest import TINY, make_project, set_params, sh

    out = {"part": "kill", "trials": args.trials}
    for name, kill_after in (("straight", None), ("killed", args.trials // 2)):
        project = make_project(tmp / name, TINY)
        set_params(project, params(args.trials, scheduler="none"))
        sh(project, sys.executable, "stages/prepare.py")
        print(f"  [{name}]", flush=True)
        wall, _ = drive(project, {}, kill_after)
        if kill_after is not None:
            resumed, lines = drive(project, {})
            wall += resumed
            out["repaired_line"] = next((x.strip() for x in lines if "newest checkpoint" in x), None)
        steps, n = trained_steps(project)
        checked = reports(project, f"sqlite:///{project / 'mlflow.db'}")
        out[name] = {"wall_s": wall, "trial_steps": steps, "tune_reports": n, **checked}
    out["trial_steps_ratio"] = out["killed"]["trial_steps"] / out["straight"]["trial_steps"]
    return out


def pbt(args, tmp: Path) -> dict:
    """PBT over lr_g, lr_d with a population of `--trials`: every report's learning rates, read from the
    optimizers (`opt/lr_*`), against the config Tune says the trial had then (mutated after each exploit),
    and each exploit a resume from the donor's checkpoint (100 steps trained since it, not a restart)."""
    from tests.integration.conftest import TINY, make_project, set_params, sh

    project = make_project(tmp / "proj", TINY)
    set_params(project, params(args.trials, scheduler="pbt", metric="w1"))
    set_params(project, {"train": {"steps": 600, "ema": 0.999}})
    sh(project, sys.executable, "stages/prepare.py")
    wall, _ = drive(project, {})
    rows = exploits = mismatched = from_scratch = 0
    for result in (project / ".ganpipe/ray").glob("ganpipe-tune-*/run_trial_*/result.json"):
        before = None
        for line in result.read_text().splitlines():
            r = json.loads(line)
            rows += 1
            lr = (r["config"]["train.lr_g"], r["config"]["train.lr_d"])
            mismatched += any(abs(o - c) > 1e-9 * c for o, c in zip((r["opt/lr_g"], r["opt/lr_d"]), lr))
            if before is not None and lr != before:  # an exploit: the donor's state, a mutated config
                exploits += 1
                from_scratch += r["steps_since_restore"] == r["step"]
            before = lr
    checked = reports(project, f"sqlite:///{project / 'mlflow.db'}")
    return {
        "part": "pbt",
        "population": args.trials,
        "wall_s": wall,
        "reports_checked": rows,
        "exploits": exploits,
        "reports_whose_optimizer_lr_differs_from_config": mismatched,
        "exploits_restarted_from_scratch": from_scratch,
        **{k: checked[k] for k in ("nested_runs", "statuses")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["single", "team", "kill", "pbt", "spread"])
    ap.add_argument("--trials", type=int, required=True)
    ap.add_argument("--storage", choices=["s3", "local"], default="s3", help="team: Ray's storage root")
    ap.add_argument("--kill-node", type=int, default=None, help="team: SIGKILL the worker node once N trials ended")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sweep-scale-", dir="/tmp"))
    try:
        parts = {"single": single, "team": team, "kill": kill, "pbt": pbt, "spread": spread}
        result = parts[args.part](args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:>28}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
