"""Bad input at the edges: one clear line, a non-zero exit, no half-written outputs."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import set_params, sh

pytestmark = pytest.mark.integration


def test_unreachable_tracking_server_fails_fast(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    set_params(project, {"tracking": {"uri": "http://127.0.0.1:9"}})
    t0 = time.perf_counter()
    p = sh(project, sys.executable, "stages/train.py", check=False)
    assert p.returncode == 1
    assert "tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9" in p.stderr
    assert time.perf_counter() - t0 < 60  # not MLflow's minutes of retries
    assert not (project / "models").exists() and not (project / "metrics/train.json").exists()


def test_corrupt_npz_is_named(project: Path):
    bad = project / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    set_params(project, {"data": {"name": "npz", "path": str(bad)}})
    p = sh(project, sys.executable, "stages/prepare.py", check=False)
    assert p.returncode == 1 and "bad.npz: not a readable .npz file" in p.stderr
    assert not (project / "data/prepared").exists()


def test_npz_points_run_through_prepare(project: Path):
    x = np.random.default_rng(0).standard_normal((300, 2)).astype(np.float32)
    np.savez(project / "points.npz", x=x)
    set_params(project, {"data": {"name": "npz", "path": "points.npz"}})
    sh(project, sys.executable, "stages/prepare.py")
    assert (project / "data/prepared/manifest.json").is_file()


def test_missing_prepared_data_points_to_prepare(project: Path):
    p = sh(project, sys.executable, "stages/train.py", check=False)
    assert p.returncode == 1 and "run the prepare stage first" in p.stderr


def test_nan_loss_stops_the_run_and_marks_it_failed(project: Path):
    # finite data so large that the discriminator's scores overflow: the losses become inf/NaN
    np.savez(project / "huge.npz", x=np.full((400, 2), 3e38, dtype=np.float32))
    set_params(project, {"data": {"name": "npz", "path": "huge.npz"}})
    sh(project, sys.executable, "stages/prepare.py")
    p = sh(project, sys.executable, "stages/train.py", check=False)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()[-1]
    assert "NonFiniteLoss" in err and "step 50: loss/" in err, err
    # that line says it all: no worker traceback before it (Ray Train logs one for any other error)
    assert "Error in training function" not in p.stdout + p.stderr, p.stderr
    assert not (project / "models").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ganpipe").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_nan_mid_run_keeps_the_last_good_checkpoint(project: Path):
    # three overflowing points among 4,000: one first lands in a batch at some seeded step, after checkpoints
    x = np.random.default_rng(0).standard_normal((4000, 2)).astype(np.float32)
    x[[7, 1000, 3000]] = 3e38
    np.savez(project / "spiky.npz", x=x)
    set_params(
        project,
        {"data": {"name": "npz", "path": "spiky.npz"}, "train": {"checkpoint_every": 5, "log_every": 5, "ema": 0.0}},
    )
    sh(project, sys.executable, "stages/prepare.py")
    p = sh(project, sys.executable, "stages/train.py", check=False)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()[-1]
    bad_step = int(re.search(r"step (\d+): loss/", err).group(1))
    states = [torch.load(f, weights_only=False) for f in (project / ".ganpipe/ray").rglob("state.pt")]
    assert states, "no checkpoint was kept"
    last = max(states, key=lambda s: s["step"])
    assert 0 < last["step"] < bad_step  # the last checkpoint is from before the bad step...
    assert all(torch.isfinite(t).all() for part in ("G", "D") for t in last[part].values())  # ...and finite
    assert not (project / "models").exists()
