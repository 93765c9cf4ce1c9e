"""The tune stage: real Ray Tune sweeps on the 2D grid, tracked as one MLflow parent run with nested
trial runs; NaN trials recorded as failed, PBT's mutated learning rates really used, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import set_params, sh, spawn, stop_group

pytestmark = pytest.mark.integration


def sweep(project: Path, tune: dict, train: dict | None = None):
    set_params(
        project,
        {"tune": tune, "train": {"steps": 300, "checkpoint_every": 100, "log_every": 50, "ema": 0.0, **(train or {})}},
    )
    return sh(project, sys.executable, "stages/tune.py")


def trials(project: Path) -> list[dict]:
    with open(project / "tune/trials.csv") as f:
        return list(csv.DictReader(f))


def checkpoints(project: Path) -> list[Path]:
    """Each trial's newest checkpoint folder in the sweep's Ray storage."""
    newest = []
    for trial in (project / ".ganpipe/ray").glob("ganpipe-tune-*/run_trial_*"):
        found = sorted(trial.glob("checkpoint_*"))
        newest += found[-1:]
    return newest


def index(checkpoint: Path) -> int:
    """A Tune checkpoint folder's number (checkpoint_000003: 3)."""
    return int(checkpoint.name.split("_")[1])


def mlflow_children(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ganpipe").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.data.tags.get("ganpipe.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_asha_sweep_writes_outputs_tracks_nested_runs_and_resumes(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    space = {"train.lr_g": {"loguniform": [1e-4, 1e-2]}, "train.lr_d": {"loguniform": [1e-4, 1e-2]}}
    first = sweep(project, {"num_samples": 4, "scheduler": "asha", "max_concurrent": 2, "search_space": space})
    rows = trials(project)
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"finished", "stopped_early"}
    assert any(r["status"] == "finished" for r in rows)
    best = yaml.safe_load((project / "tune/best_params.yaml").read_text())
    winner = min((r for r in rows if r["status"] == "finished"), key=lambda r: float(r["w1"]))
    assert best["train"]["lr_g"] == pytest.approx(float(winner["train.lr_g"]))
    assert (project / "tune/results.png").stat().st_size > 0
    # one progress line per trial as it ends, with the running counts; the last says all ended
    progress = [line for line in first.stdout.splitlines() if line.startswith("[tune] trial ")]
    assert len(progress) == 4, first.stdout
    assert {line.split()[2].split("/")[1] for line in progress} == {"4"}
    ids = {r["trial_id"] for r in rows}
    assert {line.split()[3] for line in progress} == ids
    assert "4 done, 0 running, 0 pending, 0 failed | all ended" in progress[-1], progress

    client, parents, children = mlflow_children(project)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    expected = {"finished": "FINISHED", "stopped_early": "KILLED"}
    by_id = {c.info.run_id: c for c in children}
    for r in rows:
        run = by_id[r["mlflow_run_id"]]
        assert run.info.status == expected[r["status"]] and run.data.tags["ganpipe.trial_status"] == r["status"]
        assert run.data.params["train.lr_g"]  # sampled values logged once as params
    # identities: the sweep's (params, data, code), each trial's its own
    assert len(parents[0].data.tags["ganpipe.identity"]) == 16
    assert len({c.data.tags["ganpipe.identity"] for c in children}) == 4
    # trials.csv: a trial number (x) and its score (y, the final tune.metric) for dvc plots
    assert [int(r["trial"]) for r in rows] == [1, 2, 3, 4] and all(r["score"] == r["w1"] for r in rows)
    history = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "w1")) for c in children}
    # each trial folder keeps Tune's result.json (its reports, read back for trials.csv) and no CSV or
    # TensorBoard copies (every snapshot of the sweep would upload them again)
    folders = list((project / ".ganpipe/ray").glob("ganpipe-tune-*/run_trial_*"))
    assert len(folders) == 4
    last_w1 = set()
    for folder in folders:
        names = {f.name for f in folder.iterdir()}
        assert "result.json" in names and not {n for n in names if n == "progress.csv" or n.startswith("events.")}
        last_w1.add(json.loads((folder / "result.json").read_text().splitlines()[-1])["w1"])
    assert last_w1 == {float(r["w1"]) for r in rows}

    # a rerun resumes the finished sweep: no trial runs again
    second = sh(project, sys.executable, "stages/tune.py")
    assert "resuming the sweep" in second.stdout, first.stdout + second.stdout
    _, _, again = mlflow_children(project)
    assert len(again) == 4
    assert {c.info.run_id: len(client.get_metric_history(c.info.run_id, "w1")) for c in again} == history

    # the documented way to train with the winner
    sh(project, sys.executable, "-m", "pipeline.cli", "apply-best")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["lr_g"] == pytest.approx(float(winner["train.lr_g"]))


def test_a_killed_driver_resumes_the_sweep_with_no_trial_lost_or_repeated(project: Path):
    """SIGKILL the process driving a 6-trial sweep (and the local Ray it started) once two trials have
    ended; the same command resumes it: the finished trials are not rerun, the interrupted ones go on
    from their last checkpoint, one MLflow parent run, every trial once, every report once."""
    sh(project, sys.executable, "stages/prepare.py")
    space = {"train.lr_g": {"loguniform": [5e-4, 2e-3]}}
    set_params(
        project,
        {
            "tune": {"num_samples": 6, "scheduler": "none", "max_concurrent": 2, "search_space": space},
            "train": {"steps": 2000, "checkpoint_every": 500, "log_every": 100, "ema": 0.0},
        },
    )
    driver = spawn(project, sys.executable, "stages/tune.py")
    seen: list[str] = []  # every line the driver prints, read as it comes so that none is lost to the kill
    reader = threading.Thread(target=lambda: seen.extend(driver.stdout), daemon=True)
    reader.start()

    def ended() -> list[str]:
        return [line.split()[3] for line in list(seen) if line.startswith("[tune] trial ")]

    def ended_in(checkpoint: Path) -> bool:
        return any(t in checkpoint.parent.name for t in ended())

    try:
        deadline = time.monotonic() + 300
        while len(ended()) < 2:
            assert time.monotonic() < deadline and driver.poll() is None, "".join(seen)
            time.sleep(0.1)
        # and once a trial still training has a checkpoint before its last (Tune snapshots the sweep right
        # after one): a trial's 4th checkpoint (checkpoint_000003, step 2000) is its last
        deadline = time.monotonic() + 120
        while not [c for c in checkpoints(project) if index(c) < 3 and not ended_in(c)]:
            assert time.monotonic() < deadline and driver.poll() is None, "no running trial checkpointed"
            time.sleep(0.05)
        time.sleep(0.5)  # for that snapshot (500 steps take a few seconds)
        os.kill(driver.pid, signal.SIGKILL)  # the driver, then what it left of its local Ray
        driver.wait()
    finally:
        stop_group(driver)
    # a third trial may have ended (and been printed) between the second and the kill
    reader.join(timeout=5)
    ended_first = ended()
    # as if every trial still training had registered one more checkpoint just before the kill: Tune
    # deletes the older one at once, yet the sweep's last snapshot still names it (what made CI fail once,
    # by chance).
    pruned = [c for c in checkpoints(project) if index(c) < 3]
    assert pruned, "no trial was still training:\n" + "".join(seen)
    for c in pruned:
        c.rename(c.with_name(f"checkpoint_{index(c) + 1:06d}"))

    second = sh(project, sys.executable, "stages/tune.py")
    assert "resuming the sweep" in second.stdout, second.stdout
    assert "they resume from their newest checkpoint" in second.stdout, second.stdout
    again = [line.split()[3] for line in second.stdout.splitlines() if line.startswith("[tune] trial ")]
    # the trials left end in the resumed sweep; a trial that finished after Tune's last snapshot of the
    # sweep (taken at least every 10 s) is restored at its final checkpoint there and trains no step
    assert set(again) | set(ended_first) == {r["trial_id"] for r in trials(project)} and len(again) <= 6, second.stdout
    rows = trials(project)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert all(r["status"] == "finished" for r in rows), rows

    client, parents, children = mlflow_children(project)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6 and {c.data.tags["ganpipe.trial_id"] for c in children} == {r["trial_id"] for r in rows}
    for c in children:  # reports at every checkpoint tick: none lost
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "w1")]
        # once each: a trial that trains again steps it had reported (it resumed from an older checkpoint,
        # renamed above) sends them to MLflow no second time
        assert sorted(steps) == [500, 1000, 1500, 2000], (c.data.tags["ganpipe.trial_id"], steps)


def test_ctrl_c_stops_the_sweep_as_interrupted_and_the_rerun_completes_it(project: Path):
    """SIGINT to the sweep's process group (a terminal's Ctrl-C) once a trial has ended: the stage exits
    non-zero in one line and writes no tune/ output (Tune's own handler ended the sweep as if done: exit
    0, a best trial picked among the trials so far, outputs DVC would cache); the rerun completes it."""
    sh(project, sys.executable, "stages/prepare.py")
    set_params(
        project,
        {
            "tune": {"num_samples": 3, "scheduler": "none", "max_concurrent": 1},
            "train": {"steps": 2000, "checkpoint_every": 500, "log_every": 100, "ema": 0.0},
        },
    )
    driver = spawn(project, sys.executable, "stages/tune.py")
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("[tune] trial ") for line in list(seen)):
            assert time.monotonic() < deadline and driver.poll() is None, "".join(seen)
            time.sleep(0.1)
        time.sleep(2)  # into the second trial
        os.killpg(driver.pid, signal.SIGINT)
        rc = driver.wait(timeout=120)
    finally:
        stop_group(driver)
    reader.join(timeout=5)
    out = "".join(seen)
    assert (
        rc == 1 and out.strip().splitlines()[-1] == "error: sweep interrupted; rerun the same command to resume it"
    ), out
    assert not (project / "tune").exists(), out

    second = sh(project, sys.executable, "stages/tune.py")
    assert "resuming the sweep" in second.stdout, second.stdout
    rows = trials(project)
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows), rows
    _, parents, children = mlflow_children(project)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 3


def test_a_nan_trial_is_recorded_as_failed_and_the_sweep_goes_on(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    space = {"train.lr_d": {"grid": [0.001, 1.0e30]}}
    out = sweep(project, {"num_samples": 1, "scheduler": "none", "search_space": space}).stdout
    rows = {float(r["train.lr_d"]): r for r in trials(project)}
    progress = [line for line in out.splitlines() if line.startswith("[tune] trial ")]
    assert len(progress) == 2 and all(" trial " in p and "/2 " in p for p in progress), out
    assert sum(" failed: " in p for p in progress) == 1 and sum(" finished: " in p for p in progress) == 1, progress
    assert rows[0.001]["status"] == "finished"
    assert rows[1.0e30]["status"] == "failed" and "NonFiniteLoss" in rows[1.0e30]["error"]
    _, _, children = mlflow_children(project)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and "NonFiniteLoss" in failed[0].data.tags["ganpipe.trial_error"]


def test_a_method_search_records_invalid_combinations_as_invalid_trials(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    space = {"loss.name": {"grid": ["nonsaturating", "wgan-gp"]}, "model.d_norm": {"grid": ["none", "batch"]}}
    out = sweep(project, {"num_samples": 1, "scheduler": "none", "search_space": space}, {"steps": 100}).stdout
    assert "1 of 4 combinations of the search space give an invalid config" in out, out
    rows = {(r["loss.name"], r["model.d_norm"]): r for r in trials(project)}
    assert len(rows) == 4
    bad = rows[("wgan-gp", "batch")]
    assert bad["status"] == "invalid" and "InvalidTrial" in bad["error"] and "model.d_norm" in bad["error"]
    assert all(r["status"] == "finished" for k, r in rows.items() if k != ("wgan-gp", "batch"))
    assert "3 finished, 0 stopped early, 0 failed, 1 invalid" in out
    assert sum(" invalid: " in line for line in out.splitlines() if line.startswith("[tune] trial ")) == 1, out


def test_a_collapsed_trial_is_stopped_early_and_its_verdict_recorded(project: Path):
    """lr_g 1e-9: G never leaves its initial, tightly bunched outputs while D keeps a gradient for it
    (mode collapse, first seen at step 350); the stopper ends the trial at its next report."""
    sh(project, sys.executable, "stages/prepare.py")
    space = {"train.lr_g": {"grid": [0.001, 1.0e-9]}}
    sweep(project, {"num_samples": 1, "scheduler": "none", "search_space": space}, {"steps": 1000})
    rows = {float(r["train.lr_g"]): r for r in trials(project)}
    assert rows[1.0e-9]["status"] == "stopped_early" and rows[1.0e-9]["diagnosis"] == "mode_collapse"
    assert rows[1.0e-9]["severe"] == "mode_collapse" and not rows[0.001]["severe"]
    assert rows[0.001]["status"] == "finished" and rows[0.001]["diagnosis"] == "healthy"
    _, _, children = mlflow_children(project)
    by_lr = {float(c.data.params["train.lr_g"]): c for c in children}
    assert by_lr[1.0e-9].data.tags["ganpipe.diagnosis"] == "mode_collapse"
    assert by_lr[1.0e-9].data.tags["ganpipe.diagnosis.mode_collapse"] == "step 350"
    assert by_lr[0.001].data.tags["ganpipe.diagnosis"] == "healthy"
    best = yaml.safe_load((project / "tune/best_params.yaml").read_text())
    assert best["train"]["lr_g"] == pytest.approx(0.001)


def test_pbt_mutates_learning_rates_and_the_optimizer_uses_them(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    space = {"train.lr_g": {"loguniform": [1e-4, 1e-2]}}
    sweep(
        project,
        {"num_samples": 2, "scheduler": "pbt", "max_concurrent": 2, "metric": "w1", "search_space": space},
        {"steps": 600},
    )
    rows = trials(project)
    assert all(r["status"] == "finished" for r in rows), rows
    # every trial's optimizer ran with the learning rate of its final (possibly mutated) config
    for r in rows:
        assert float(r["opt/lr_g"]) == pytest.approx(float(r["train.lr_g"]))
    _, _, children = mlflow_children(project)
    initial = {c.data.tags["ganpipe.trial_id"]: float(c.data.params["train.lr_g"]) for c in children}
    assert any(float(r["train.lr_g"]) != pytest.approx(initial[r["trial_id"]]) for r in rows)


def test_multi_worker_trials_fit_a_train_run_each_and_report_to_tune(project: Path):
    """train.num_workers: 2 -> every trial drives a Ray Train run (2 gloo workers); its evaluations
    reach Tune under the same names as single-worker trials, and each trial's MLflow run has them."""
    sh(project, sys.executable, "stages/prepare.py")
    space = {"train.lr_g": {"grid": [0.0005, 0.002]}}
    out = sweep(
        project,
        {"num_samples": 1, "scheduler": "none", "max_concurrent": 1, "search_space": space},
        {"steps": 100, "checkpoint_every": 50, "num_workers": 2},
    )
    rows = trials(project)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows), rows
    assert all(int(float(r["step"])) == 100 and float(r["w1"]) > 0 for r in rows), rows
    assert "2 worker(s) on cpu" in out.stdout
    client, _, children = mlflow_children(project)
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val/w1")]
        assert steps == [50, 100], steps  # evaluated at every checkpoint


def test_pbt_with_multi_worker_trials_is_refused_before_anything_starts(project: Path):
    set_params(
        project,
        {
            "train": {"num_workers": 2},
            "tune": {"scheduler": "pbt", "search_space": {"train.lr_g": {"loguniform": [1e-4, 1e-2]}}},
        },
    )
    p = sh(project, sys.executable, "stages/tune.py", check=False)
    assert p.returncode == 2 and "tune.scheduler: pbt" in p.stderr and "num_workers" in p.stderr
    assert not (project / "tune").exists()


def test_image_trials_train_from_the_memory_mapped_store(project: Path):
    """shapes keeps its images as the uint8 store: single-worker and 2-worker trials receive it by
    path (data.StoreFile), map it, and report FID in the features stage's extractor."""
    set_params(
        project,
        {
            "data": {"name": "shapes", "n_samples": 600, "resolution": 16},
            "model": {"arch": "dcgan", "z_dim": 16, "hidden": 8},
            "eval": {"live_samples": 100},
        },
    )
    sh(project, sys.executable, "stages/prepare.py")
    assert (project / "data/prepared/train.x.npy").is_file()
    sh(project, sys.executable, "stages/features.py")
    space = {"train.lr_g": {"grid": [0.0005, 0.002]}}
    for workers, steps in ((1, 20), (2, 30)):  # another step count: a new sweep, not the first handed back
        out = sweep(
            project,
            {"num_samples": 1, "scheduler": "none", "max_concurrent": 1, "metric": "fid", "search_space": space},
            {"steps": steps, "checkpoint_every": 10, "batch_size": 32, "num_workers": workers},
        )
        rows = trials(project)
        assert len(rows) == 2 and all(r["status"] == "finished" for r in rows), out.stdout[-2000:]
        assert all(int(float(r["step"])) == steps and float(r["fid"]) > 0 for r in rows), rows
        assert workers == 1 or "2 worker(s) on cpu" in out.stdout
