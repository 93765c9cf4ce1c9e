"""The MLflow tracking server goes away during training and comes back: training goes on, and every
logged step reaches the server. A real `mlflow server` (sqlite backend) on a loopback port, stopped
and restarted on the same port and the same backend store."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, env, free_port, set_params, sh, spawn, stop_group

pytestmark = pytest.mark.integration


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    workdir.mkdir(exist_ok=True)
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(workdir / "server.log", "ab") as log:
        p = subprocess.Popen(
            cmd,
            env=env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            pass
        assert p.poll() is None, (workdir / "server.log").read_text()[-3000:]
        time.sleep(0.3)
    stop_group(p)
    raise TimeoutError("mlflow server did not come up")


class Lines:
    """A child's merged output, line by line, with the time each line arrived."""

    def __init__(self, p: subprocess.Popen):
        self.items: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(p,), daemon=True)
        self.thread.start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stdout:
            self.items.append((time.monotonic(), line.rstrip("\n")))

    def steps(self, since: float = 0.0) -> list[int]:
        return [
            int(line.split()[2].split("/")[0])
            for t, line in self.items
            if t >= since and line.startswith("[train] step ")
        ]

    def wait_for_step(self, p: subprocess.Popen, above: int, timeout: float, since: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and p.poll() is None:
            if any(s > above for s in self.steps(since)):
                return
            time.sleep(0.1)

    def text(self) -> str:
        return "\n".join(line for _, line in self.items)


def test_server_stopped_mid_training_loses_no_metric_step(project: Path, tmp_path: Path):
    port = free_port()
    server_dir = tmp_path / "server"
    server = start_server(server_dir, port)
    train = None
    try:
        steps, log_every = 6000, 20
        set_params(
            project,
            {
                "tracking": {"uri": f"http://127.0.0.1:{port}"},
                "train": {"steps": steps, "log_every": log_every, "checkpoint_every": 2000},
            },
        )
        sh(project, sys.executable, "stages/prepare.py")
        train = spawn(project, sys.executable, "stages/train.py")
        out = Lines(train)
        out.wait_for_step(train, 0, timeout=300)
        assert out.steps(), out.text()
        stop_group(server)  # the server goes away mid-run
        down_at = time.monotonic()
        stopped_at = max(out.steps())
        out.wait_for_step(train, stopped_at + 10 * log_every, timeout=120, since=down_at)
        trained_while_down = [s for s in out.steps(since=down_at) if s > stopped_at]
        time.sleep(3)  # some more ticks while the sender backs off
        server = start_server(server_dir, port)  # the same port and backend store
        assert train.wait(timeout=600) == 0, out.text()[-4000:]
        out.thread.join(timeout=10)

        from mlflow.tracking import MlflowClient

        text = out.text()
        assert trained_while_down, text[-4000:]  # training did not wait for the server
        assert "is not answering" in text and "is back" in text, text[-4000:]
        assert "never reached the MLflow server" not in text
        logged = [int(r["step"]) for r in csv.DictReader(open(project / "models/history.csv"))]
        assert logged == list(range(log_every, steps + 1, log_every))

        run_id = json.loads((project / "models/run.json").read_text())["mlflow_run_id"]
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        for key in ("loss/D", "loss/G"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == logged, key  # every step, once
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not (project / ".ganpipe/unsent-metrics").exists() or not any(
            (project / ".ganpipe/unsent-metrics").iterdir()
        )
    finally:
        if train is not None:
            stop_group(train)  # the driver and the local Ray it started
        stop_group(server)


def test_server_stopped_mid_sweep_fails_no_trial_and_loses_no_report(project: Path, tmp_path: Path):
    """Tune trials send their reports through the same buffer: an outage while trials train fails
    none of them, and every checkpoint report reaches the server once it is back."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    server_dir = tmp_path / "server"
    server = start_server(server_dir, port)
    uri = f"http://127.0.0.1:{port}"
    steps, every = 4000, 200
    space = {"train.lr_g": {"loguniform": [5e-4, 2e-3]}}
    set_params(
        project,
        {
            "tracking": {"uri": uri},
            "train": {"steps": steps, "checkpoint_every": every, "log_every": every},
            "tune": {"num_samples": 2, "scheduler": "none", "max_concurrent": 2, "search_space": space},
        },
    )
    sh(project, sys.executable, "stages/prepare.py")
    sweep = spawn(
        project,
        sys.executable,
        "stages/tune.py",
        # MLflow's own client retries for minutes: without retries, any call that waited on the
        # server during the outage would fail its trial
        extra_env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    out = Lines(sweep)
    try:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sweep.poll() is None:  # both trials have reported
            exp = client.get_experiment_by_name("ganpipe")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
            if len(children) == 2 and all("w1" in c.data.metrics for c in children):
                break
            time.sleep(0.5)
        assert sweep.poll() is None, out.text()[-4000:]
        stop_group(server)  # the server goes away while both trials train
        time.sleep(4)
        server = start_server(server_dir, port)
        assert sweep.wait(timeout=600) == 0, out.text()[-4000:]
        out.thread.join(timeout=10)

        rows = list(csv.DictReader(open(project / "tune/trials.csv")))
        assert [r["status"] for r in rows] == ["finished", "finished"], out.text()[-4000:]
        client = MlflowClient(tracking_uri=uri)
        for r in rows:  # every report, once, in each trial's run
            steps_logged = sorted(m.step for m in client.get_metric_history(r["mlflow_run_id"], "w1"))
            assert steps_logged == list(range(every, steps + 1, every)), r
        assert "never reached the MLflow server" not in out.text()
    finally:
        stop_group(sweep)
        stop_group(server)
