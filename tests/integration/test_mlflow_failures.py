"""MLflow failing at any moment, with real servers: a server that dies as training ends gives one line,
the spill, and a run a rerun finishes; the registry hears of a model only once its export folder is
complete; a wrong password is found before any work."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, set_params, sh, spawn, stop_group
from tests.integration.test_tracking_outage import Lines, start_server

pytestmark = pytest.mark.integration


def test_server_gone_when_training_ends_fails_in_one_line_and_a_rerun_logs_the_run(project: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server_dir = tmp_path / "server"
    server = start_server(server_dir, port)
    uri = f"http://127.0.0.1:{port}"
    train = None
    try:
        steps, log_every = 3000, 50
        set_params(
            project,
            {
                "tracking": {"uri": uri, "flush_timeout_s": 1},
                "train": {"steps": steps, "log_every": log_every, "checkpoint_every": 1000},
                "eval": {"every": 0},
            },
        )
        sh(project, sys.executable, "stages/prepare.py")
        train = spawn(project, sys.executable, "stages/train.py")
        out = Lines(train)
        out.wait_for_step(train, 0, timeout=300)
        assert out.steps(), out.text()
        stop_group(server)  # gone for good: training goes on, and ends with no server to log to
        down = time.monotonic()
        rc = train.wait(timeout=600)
        out.thread.join(timeout=10)
        text = out.text()
        assert rc == 1, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        error = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(error) == 1 and "the MLflow server at http://127.0.0.1" in error[0], text[-3000:]
        assert "failed after training" in error[0] and "Rerun `dvc repro`" in error[0]
        assert time.monotonic() - down < 240  # seconds of bounded retries, not minutes per call
        spill = next((project / ".ganpipe/unsent-metrics").glob("*.jsonl"))
        assert str(spill.relative_to(project)) in error[0] or spill.name in error[0]
        record = json.loads((project / "models/run.json").read_text())
        assert (project / "models/generator.pt").is_file() and not record["handed_back"]

        server = start_server(server_dir, port)  # back, with the same store
        again = sh(project, sys.executable, "stages/train.py", timeout=600)
        assert "reused finished run" in again.stdout, again.stdout[-3000:]
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"
        assert not spill.exists()  # delivered
        logged = sorted(m.step for m in client.get_metric_history(record["mlflow_run_id"], "loss/D"))
        assert logged == list(range(log_every, steps + 1, log_every))  # every step, once
    finally:
        if train is not None:
            stop_group(train)
        stop_group(server)


def test_the_registry_hears_of_a_model_only_once_its_export_folder_is_complete(project: Path):
    from mlflow.tracking import MlflowClient

    set_params(project, {"train": {"steps": 200, "checkpoint_every": 100, "log_every": 50}, "eval": {"every": 0}})
    for stage in ("prepare", "train", "evaluate"):
        sh(project, sys.executable, f"stages/{stage}.py")
    # the model card cannot be written (a full disk, say): the export folder never completes
    broken = sh(
        project,
        sys.executable,
        "-c",
        "import sys; from pipeline.io import export\n"
        "def fail(*a, **k): raise OSError('no space left on device')\n"
        "export.model_card = fail\n"
        "from stages.export import main; sys.exit(main([]))",
        check=False,
    )
    assert broken.returncode == 1 and "error: no space left on device" in broken.stderr, broken.stderr[-2000:]
    assert not (project / "export").exists()
    assert not [p for p in project.iterdir() if p.name.startswith(".ganpipe-tmp-")]  # nothing left in the tree
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert client.search_registered_models() == []

    sh(project, sys.executable, "stages/export.py")
    card = json.loads((project / "export/model_card.json").read_text())
    versions = client.search_model_versions("name = 'ganpipe-generator'")
    assert [int(v.version) for v in versions] == [1] and card["mlflow"]["model_uri"] == "models:/ganpipe-generator/1"
    assert sh(project, "git", "status", "--porcelain", "--ignored").stdout.count(".ganpipe-tmp-") == 0
    # as MLflow's users expect: a signature and an input example, and the PyTorch generator beside it
    import mlflow
    from mlflow.models import get_model_info

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    info = get_model_info("models:/ganpipe-generator/1")
    assert info.signature.inputs.input_names() == ["z"] and info.saved_input_example_info is not None
    assert info.signature.outputs.input_names() == ["x"]  # what the ONNX model's predict returns: {"x": ...}
    experiment = client.get_experiment_by_name("ganpipe").experiment_id
    assert "generator_pytorch" in {m.name for m in client.search_logged_models(experiment_ids=[experiment])}


@pytest.fixture
def auth_stack(tmp_path: Path):
    from pipeline.io import teamstack

    if why := teamstack.auth_unavailable():
        pytest.skip(why)
    with teamstack.start_stack(tmp_path / "stack", auth=True) as stack:
        yield stack


def test_a_wrong_password_is_found_before_any_work(auth_stack, project: Path):
    from pipeline.io import tracking

    good = auth_stack.env()
    tracking.check_credentials(good["MLFLOW_TRACKING_URI"], env=good)  # the stack's own user passes
    set_params(project, {"tracking": {"uri": good["MLFLOW_TRACKING_URI"]}})
    sh(project, sys.executable, "stages/prepare.py")
    wrong = {**good, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    t0 = time.monotonic()
    p = sh(project, sys.executable, "stages/train.py", check=False, extra_env=wrong)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: tracking.uri: the MLflow server at http")
    assert "refused the credentials" in p.stderr and "Traceback" not in p.stderr
    assert "not-the-password" not in p.stdout + p.stderr
    assert "[train] step" not in p.stdout and time.monotonic() - t0 < 60  # before Ray, before training
    assert not (project / "models").exists()


def test_a_run_left_by_a_stage_that_failed_is_never_running(project: Path):
    """A stage that stops after opening its MLflow run (here: Ray cannot start the workers it asks
    for) ends the run FAILED."""
    from mlflow.tracking import MlflowClient

    set_params(project, {"train": {"steps": 100, "use_gpu": True}, "eval": {"every": 0}})
    sh(project, sys.executable, "stages/prepare.py")
    p = sh(project, sys.executable, "stages/train.py", check=False)
    assert p.returncode == 1 and "train.use_gpu: true needs one GPU per worker" in p.stderr, p.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ganpipe").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
