"""A password in tracking.uri (with the characters that need percent-encoding) goes nowhere: not into
any file the pipeline and the sweep write, not into the MLflow server's store (params, tags,
artifacts), not into anything printed. A real `dvc repro` and tune stage, a real `mlflow server`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, set_params, sh, stop_group
from tests.integration.test_tracking_outage import start_server

pytestmark = pytest.mark.integration

PASSWORD = "S3cr@t-p:ss/w0rd"
ENCODED = "S3cr%40t-p%3Ass%2Fw0rd"  # as it must be written inside a URI


def _files_with(root: Path, needles: tuple[str, ...], skip: set[Path]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if not path.is_file() or path in skip or ".git" in path.relative_to(root).parts:
            continue
        data = path.read_bytes()
        if any(n.encode() in data for n in needles):
            hits.append(str(path.relative_to(root)))
    return hits


def test_a_password_in_the_tracking_uri_reaches_no_output_no_mlflow_record_and_no_log(project: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server_dir = tmp_path / "server"
    server = start_server(server_dir, port)  # takes any credentials: what matters is where they end up
    try:
        uri = f"http://ganpipe:{ENCODED}@127.0.0.1:{port}"
        set_params(
            project,
            {
                "tracking": {"uri": uri},
                "tune": {"num_samples": 2, "max_concurrent": 1, "scheduler": "none"},
                "train": {"steps": 200, "checkpoint_every": 100},
            },
        )
        printed = ""
        for cmd in (("dvc", "repro"), (sys.executable, "stages/tune.py")):
            run = sh(project, *cmd, timeout=900)
            printed += run.stdout + run.stderr
        assert "Running stage 'export'" in printed and "[tune] wrote tune/best_params.yaml" in printed
        needles = (PASSWORD, ENCODED, "S3cr")
        shown = [line for line in printed.splitlines() if any(n in line for n in needles)]
        assert shown == [], shown
        assert (project / "tune/best_params.yaml").is_file() and (project / "tune/trials.csv").is_file()
        leaked = _files_with(project, needles, skip={project / "params.yaml"})
        assert leaked == [], leaked
        assert _files_with(server_dir, needles, skip=set()) == []  # the server's database and artifacts

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) >= 4  # the training, the sweep and its 2 trials
        for r in runs:
            record = " ".join(f"{k}={v}" for k, v in {**r.data.params, **r.data.tags}.items())
            assert not [n for n in needles if n in record], r.info.run_id
        assert any(v == "http://***@127.0.0.1:%d" % port for r in runs for v in r.data.params.values())
    finally:
        stop_group(server)
