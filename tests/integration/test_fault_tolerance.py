"""A worker killed mid-run (a real SIGKILL to its process id) is replaced by Ray Train and the run
finishes from the last checkpoint; the restart is recorded in the run record (models/run.json) and MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import set_params, sh, spawn

pytestmark = pytest.mark.integration


def test_killed_worker_is_replaced_and_training_completes(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    steps = 2000
    set_params(
        project,
        {"train": {"num_workers": 2, "max_failures": 2, "steps": steps, "checkpoint_every": 200, "log_every": 100}},
    )
    p = spawn(project, sys.executable, "stages/train.py")
    out, victim, killed = [], None, False
    try:
        for line in p.stdout:
            out.append(line)
            m = re.search(r"2 worker\(s\) on cpu \(pids (\d+) (\d+)\)", line)
            if m and victim is None:
                victim = int(m.group(2))  # rank 1
            step = re.match(r"\[train\] step (\d+)/", line)
            if victim and not killed and step and int(step.group(1)) >= 1000:
                os.kill(victim, signal.SIGKILL)
                killed = True
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = "".join(out)
    assert killed, text
    assert p.returncode == 0, text
    assert re.search(r"resuming from checkpoint at step \d+ \(restarts so far: 1\)", text), text

    assert json.loads((project / "metrics/train.json").read_text())["steps"] == steps
    info = json.loads((project / "models/run.json").read_text())
    assert info["restarts"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["sys/restarts"] == 1
