"""Native DVC experiments (`dvc exp run --temp`, `--queue` + `dvc queue start`) run in a throwaway
copy of the repository; their MLflow runs, registry entries and Ray checkpoints must land in the
repository's own embedded stores, where `mlflow ui` and the next `dvc repro` find them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.conftest import sh

pytestmark = pytest.mark.integration


def wait_for_queue(project: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(project, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise TimeoutError(f"the DVC queue did not finish in {timeout}s:\n{status}")


def test_temp_and_queued_experiments_land_in_the_repository_stores(project: Path):
    temp = sh(project, "dvc", "exp", "run", "--temp", "--name", "tmp-exp", "-S", "train.lr_g=0.002")
    assert "reused finished run" not in temp.stdout
    sh(project, "dvc", "exp", "run", "--queue", "--name", "q-exp", "-S", "train.lr_d=0.002")
    try:
        sh(project, "dvc", "queue", "start", "-j", "1")
        status = wait_for_queue(project)
    finally:
        sh(project, "dvc", "queue", "stop", check=False)
    assert "Success" in status and "Failed" not in status, status

    # the repository root holds both runs' stores; the throwaway copies kept nothing of their own
    runs = sorted(p.name for p in (project / ".ganpipe/ray").iterdir())
    assert len(runs) == 2 and all(r.startswith("ganpipe-grid-") for r in runs), runs
    leftovers = [p for p in (project / ".dvc/tmp").rglob("*") if p.name in ("mlflow.db", "mlruns", ".ganpipe")]
    assert not leftovers, leftovers

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ganpipe")
    assert exp.artifact_location.startswith((project / "mlruns").as_uri())
    by_exp = {
        r.data.tags.get("ganpipe.dvc_exp_name"): r
        for r in client.search_runs([exp.experiment_id], filter_string="tags.`ganpipe.dvc_stage` = 'train'")
    }
    assert set(by_exp) == {"tmp-exp", "q-exp"}, by_exp.keys()
    head = sh(project, "git", "rev-parse", "HEAD").stdout.strip()
    for name, run in by_exp.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["ganpipe.dvc_exp_baseline_rev"] == head
        assert "eval/w1" in run.data.metrics  # evaluate logged into the same run
    assert by_exp["tmp-exp"].data.params["train.lr_g"] == "0.002"
    assert by_exp["q-exp"].data.params["train.lr_d"] == "0.002"
    versions = client.search_model_versions("name='ganpipe-generator'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in by_exp.values()}

    # the experiments are DVC's own: their metrics are there to compare
    shown = sh(project, "dvc", "exp", "show", "--csv").stdout
    assert "tmp-exp" in shown and "q-exp" in shown
