"""One run identity through real `dvc repro`: a code change retrains, a comment or an operational
setting does not; the run record says what happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import set_params, sh
from tests.integration.test_dvc_pipeline import ran_stages

pytestmark = pytest.mark.integration


def record(project: Path) -> dict:
    return json.loads((project / "models/run.json").read_text())


def weights(project: Path) -> dict:
    return torch.load(project / "models/generator.pt", weights_only=True)["state_dict"]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_code_edits_retrain_comments_and_operational_keys_do_not(project: Path):
    sh(project, "dvc", "repro")
    first, w1 = record(project), weights(project)
    metrics = (project / "metrics/train.json").read_text()
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "first run")

    # operational keys: no stage reruns
    set_params(
        project,
        {
            "train": {
                "log_every": 25,
                "checkpoint_every": 150,
                "keep_checkpoints": 3,
                "max_failures": 1,
                "num_workers": 2,
            }
        },
    )
    assert "up to date" in sh(project, "dvc", "status").stdout.lower()
    assert ran_stages(sh(project, "dvc", "repro").stdout) == []
    sh(project, "git", "checkout", "params.yaml")

    # a comment-only edit of a result module: DVC reruns train, which hands the finished run back
    losses = project / "pipeline/core/losses.py"
    text = losses.read_text()
    losses.write_text(text + "\n# a comment changes no number\n")
    out = sh(project, "dvc", "repro").stdout
    assert "train" in ran_stages(out)
    assert f"reused finished run {first['mlflow_run_id']}" in out, out
    again = record(project)
    assert again["handed_back"] and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["finished_at"] == first["finished_at"] and again["trained_s"] == first["trained_s"]
    assert same(weights(project), w1) and (project / "metrics/train.json").read_text() == metrics

    # the bug report's edit: the generator's loss multiplied by 0. A new run, new weights.
    old = "lambda f: F.softplus(-f).mean()"
    assert old in text
    losses.write_text(text.replace(old, "lambda f: 0 * F.softplus(-f).mean()"))
    out = sh(project, "dvc", "repro").stdout
    assert "reused finished run" not in out and "resuming" not in out, out
    new = record(project)
    assert new["mlflow_run_id"] != first["mlflow_run_id"] and new["identity"] != first["identity"]
    assert not new["handed_back"] and not new["resumed"]
    assert not same(weights(project), w1)
    assert json.loads((project / "metrics/train.json").read_text())["loss_G"] == 0.0

    # the MLflow runs carry their identity
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    for r in (first, new):
        assert client.get_run(r["mlflow_run_id"]).data.tags["ganpipe.identity"] == r["identity"]


def test_two_pipelines_from_two_clones_run_at_once(project: Path, tmp_path: Path):
    """Each starts a local Ray of its own; Ray Train's helpers must find their own among two."""
    import shutil

    from tests.integration.conftest import spawn

    other = tmp_path / "other"
    shutil.copytree(project, other)
    procs = [spawn(p, "dvc", "repro", "train") for p in (project, other)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "Traceback" not in out and "multiple active Ray instances" not in out, out
    assert record(project)["identity"] == record(other)["identity"]  # the same run, trained twice
    assert same(weights(project), weights(other))


def test_a_second_run_of_the_same_identity_on_a_shared_storage_root_refuses_and_leaves_the_first_alone(
    project: Path, tmp_path: Path
):
    """Two clones, one storage.root (a team's shared store): the second process refuses in one line
    naming the first, the first finishes untouched, and the second then hands its run back."""
    import shutil
    import sys

    from tests.integration.conftest import spawn, stop_group
    from tests.integration.test_tracking_outage import Lines

    shared = tmp_path / "shared-ray"
    set_params(project, {"storage": {"root": str(shared)}, "train": {"steps": 4000, "log_every": 100}})
    other = tmp_path / "other"
    shutil.copytree(project, other)
    for p in (project, other):
        sh(p, sys.executable, "stages/prepare.py")
    first = spawn(project, sys.executable, "stages/train.py")
    try:
        out = Lines(first)
        out.wait_for_step(first, 0, timeout=300)
        assert out.steps(), out.text()
        second = sh(other, sys.executable, "stages/train.py", check=False)
        assert second.returncode == 1, second.stdout[-2000:]
        line = second.stderr.strip()
        assert line.startswith("error: storage.root: the run ganpipe-grid-") and f"pid {first.pid}" in line, line
        assert not (other / "models").exists() and not (other / "mlflow.db").exists()
        assert first.wait(timeout=600) == 0, out.text()[-3000:]
    finally:
        stop_group(first)
    again = sh(other, sys.executable, "stages/train.py")
    assert "reused finished run" in again.stdout
    assert same(weights(project), weights(other))
    assert not list(shared.glob("*.lease.json"))  # released
