"""`dvc repro` end to end in a temporary git repo: real DVC, real local Ray, real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import set_params, sh

pytestmark = pytest.mark.integration


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def test_repro_runs_every_stage_then_only_what_changed(project: Path):
    first = sh(project, "dvc", "repro")
    assert sorted(ran_stages(first.stdout)) == ["evaluate", "export", "features", "prepare", "train"]

    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert manifest["n_train"] + manifest["n_val"] == 2000 and manifest["sample_shape"] == [2]
    assert json.loads((project / "metrics/train.json").read_text())["steps"] == 300
    train = json.loads((project / "models/run.json").read_text())  # the run record: ids and paths
    assert train["mlflow_run_id"] and not train["handed_back"] and not train["resumed"]
    assert train["ray_result_path"].startswith(".ganpipe/ray/ganpipe-grid-")  # relative: no machine path
    assert train["mlflow_tracking_uri"] == "sqlite:///mlflow.db"
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert set(ev) >= {"modes", "hq_fraction", "reverse_kl", "w1"} and ev["n_samples"] == 500
    assert 0 <= ev["modes"] <= 25 and 0.0 <= ev["hq_fraction"] <= 1.0 and ev["w1"] > 0
    for f in ("models/generator.pt", "plots/samples.png", "plots/losses.csv", "export/generator.pt"):
        assert (project / f).stat().st_size > 0, f
    card = json.loads((project / "export/model_card.json").read_text())
    assert card["data"]["content_hash"] == manifest["content_hash"]
    assert card["outputs"]["x"]["data_range"] == manifest["range"]  # what "the data's own scale" is
    assert card["git"]["commit"] and card["mlflow"]["run_id"] == train["mlflow_run_id"]
    assert all(v < 1e-4 for v in card["parity_max_abs_diff"].values())

    # the exported ONNX graph is a working generator: (N, z_dim) -> (N, 2), any N
    import onnxruntime as ort

    sess = ort.InferenceSession(str(project / "export/generator.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"z": np.random.default_rng(0).standard_normal((7, 2)).astype(np.float32)})[0]
    assert out.shape == (7, 2) and np.isfinite(out).all()

    # MLflow holds the run: params once, per-step curves from rank 0, eval metrics, the registered model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(train["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr_d"] == "0.001"
    assert len(client.get_metric_history(run.info.run_id, "loss/D")) == 300 // 50
    assert "eval/w1" in run.data.metrics
    # the stability monitor: its verdict in DVC metrics, as MLflow tags and artifact, its signals as metrics
    diagnosis = json.loads((project / "metrics/diagnostics.json").read_text())
    assert diagnosis["verdict"] == run.data.tags["ganpipe.diagnosis"] and diagnosis["rollbacks"] == 0
    assert set(diagnosis["signals"]) >= {"grad/D", "grad/G", "grad/G_scores", "fake/spread", "D/r_heldout"}
    assert len(client.get_metric_history(run.info.run_id, "grad/G_scores")) == 300 // 50
    artifact = client.download_artifacts(run.info.run_id, "diagnostics.json", str(project / "dl"))
    assert json.loads(Path(artifact).read_text())["thresholds"]["overfit_target"] == 0.6
    assert client.get_model_version_by_alias("ganpipe-generator", "candidate").run_id == run.info.run_id
    tags = run.data.tags  # lineage: from the run back to code, data, params and the Ray run
    assert tags["mlflow.source.git.commit"] == card["git"]["commit"] and tags["ganpipe.git_dirty"] in ("true", "false")
    assert tags["ganpipe.data_hash"] == manifest["content_hash"] and tags["ganpipe.dvc_stage"] == "train"
    assert len(tags["ganpipe.params_hash"]) == 12 and tags["ganpipe.ray_run"].endswith(
        train["ray_result_path"].split("/")[-1]
    )

    # registry: the first candidate becomes champion, the same version again is refused with a reason
    assert "promoted: version 1 is now champion" in sh(project, "ganpipe", "promote").stdout
    assert "already the champion" in sh(project, "ganpipe", "promote").stdout
    sh(project, "ganpipe", "sample", "--model", "models:/ganpipe-generator@champion", "--n", "9", "--out", "s.npy")
    assert np.load(project / "s.npy").shape == (9, 2)

    second = sh(project, "dvc", "repro")
    assert ran_stages(second.stdout) == []

    set_params(project, {"eval": {"n_samples": 400}})
    third = sh(project, "dvc", "repro")
    assert ran_stages(third.stdout) == ["evaluate", "export"]
    assert json.loads((project / "metrics/eval.json").read_text())["n_samples"] == 400

    set_params(project, {"train": {"lr_g": 0.002}})  # a train.* change leaves the data stages alone
    fourth = sh(project, "dvc", "repro")
    assert sorted(ran_stages(fourth.stdout)) == ["evaluate", "export", "train"]

    # every evaluation carries its protocol (metrics, MLflow tags); promote compares only like with like
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["protocol"] == {
        "space": "points",
        "extractor_sha256": None,
        "real_split": "val",
        "n_real": 200,
        "n_fake": 400,
        "seed": 1,
    }
    set_params(project, {"eval": {"n_samples": 300}})
    assert ran_stages(sh(project, "dvc", "repro").stdout) == ["evaluate", "export"]
    refused = sh(project, "ganpipe", "promote", check=False)
    assert refused.returncode == 1
    assert "evaluated under different protocols (n_fake: 300 vs 400)" in refused.stderr, refused.stderr


def test_bad_params_fail_before_work_and_write_nothing(project: Path):
    set_params(project, {"train": {"lr_d": -1}})
    p = sh(project, "dvc", "repro", check=False)
    assert p.returncode != 0
    assert "train.lr_d: must be > 0, got -1" in p.stdout + p.stderr
    assert not (project / "data/prepared").exists()


def test_a_local_data_file_under_data_inputs_reruns_prepare_when_edited_in_place(project: Path):
    rng = np.random.default_rng(0)
    path = project / "data/inputs/points.npz"
    np.savez(path, x=rng.standard_normal((300, 2)).astype(np.float32))
    set_params(project, {"data": {"name": "npz", "path": "data/inputs/points.npz"}})
    first = sh(project, "dvc", "repro", "prepare")
    assert ran_stages(first.stdout) == ["prepare"] and "warning" not in first.stderr
    assert ran_stages(sh(project, "dvc", "repro", "prepare").stdout) == []  # nothing changed
    np.savez(path, x=rng.standard_normal((300, 2)).astype(np.float32))  # the same name, new content
    assert ran_stages(sh(project, "dvc", "repro", "prepare").stdout) == ["prepare"]

    np.savez(project / "elsewhere.npz", x=rng.standard_normal((300, 2)).astype(np.float32))
    set_params(project, {"data": {"path": "elsewhere.npz"}})
    outside = sh(project, "dvc", "repro", "prepare")
    assert "data.path elsewhere.npz is outside data/inputs/, so DVC does not rerun prepare" in outside.stderr
