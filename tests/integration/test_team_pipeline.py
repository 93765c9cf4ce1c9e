"""The whole pipeline in team mode, against the local team stack (moto S3 + an MLflow server with its
artifacts on that S3, basic auth when available; SQLite or PostgreSQL behind it): data read from S3,
Ray checkpoints on S3, MLflow artifacts on S3, lineage tags, the registry alias, `promote`, a DVC
remote on S3 (push, wipe, pull), and no credential value anywhere in what the run leaves behind."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import data
from pipeline.io.teamstack import auth_unavailable, postgres_unavailable, start_postgres, start_stack
from tests.integration.conftest import set_params, sh

pytestmark = pytest.mark.integration

# distinctive values: if any of them shows up in a record or an output, a credential leaked
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAGANPIPELEAKCHECK7",
    "AWS_SECRET_ACCESS_KEY": "ganpipe-aws-secret-Qw8rT5yU1iO3pA6s",
}
FAKE_MLFLOW_PASSWORD = "ganpipe-mlflow-password-Zx4cV7bN2m"
OUTPUTS = ("data/prepared", "models", "plots", "export", "metrics")


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for top in OUTPUTS:
        for f in sorted((root / top).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in blob]


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request, tmp_path: Path):
    stop_pg = None
    uri = None
    if request.param == "postgres":
        why = postgres_unavailable()
        if why:
            pytest.skip(f"PostgreSQL backend unavailable: {why}")
        uri, stop_pg = start_postgres(tmp_path / "pg")
    try:
        s = start_stack(tmp_path / "stack", postgres_uri=uri, auth=auth_unavailable() is None)
        try:
            yield s
        finally:
            s.stop()
    finally:
        if stop_pg is not None:
            stop_pg()


def test_team_pipeline_on_s3_with_lineage_registry_dvc_remote_and_no_leaked_secrets(
    project: Path, tmp_path: Path, stack, monkeypatch: pytest.MonkeyPatch
):
    import mlflow
    from mlflow.tracking import MlflowClient

    s3 = stack.s3_client()
    x, _ = data.sample_mixture("grid", 2000, np.random.default_rng(0))
    buf = io.BytesIO()
    np.savez(buf, x=x)
    s3.put_object(Bucket=stack.bucket, Key="datasets/grid.npz", Body=buf.getvalue())

    # one endpoint setting for every tool: AWS_ENDPOINT_URL (no storage.s3_endpoint_url, no MLFLOW_S3_ENDPOINT_URL)
    env = {k: v for k, v in stack.env().items() if k not in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    env.update(SECRETS, AWS_ENDPOINT_URL=stack.s3_endpoint_url)
    if not stack.auth:  # the server ignores it, but the client sends it: it must not be recorded either
        env.update(MLFLOW_TRACKING_USERNAME="ganpipe-user", MLFLOW_TRACKING_PASSWORD=FAKE_MLFLOW_PASSWORD)
    secrets = {**SECRETS, "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_TRACKING_PASSWORD"]}
    set_params(
        project,
        {
            "data": {"name": "npz", "path": f"s3://{stack.bucket}/datasets/grid.npz"},
            "storage": {"root": stack.storage_root},
            "tracking": {"experiment": "team"},
        },
    )
    sh(project, "git", "commit", "-qam", "team params")

    sh(project, "dvc", "repro", extra_env=env, timeout=900)

    for k, v in env.items():  # for this test's own MLflow client
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    train = json.loads((project / "models/run.json").read_text())
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    run = client.get_run(train["mlflow_run_id"])
    run_id = run.info.run_id

    # checkpoints and artifacts are S3 objects
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket)
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith("ray/") and k.endswith("/state.pt") for k in keys), keys
    assert train["ray_result_path"].startswith(f"{stack.bucket}/ray/")
    assert any(k.startswith("mlflow/") and k.endswith(f"{run_id}/artifacts/models/generator.pt") for k in keys), keys
    assert any(k.startswith("mlflow/") and k.endswith("export/model_card.json") for k in keys), keys

    # every logged step reached the server (through basic auth when it is on)
    logged = [int(r["step"]) for r in csv.DictReader(open(project / "models/history.csv"))]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss/D")) == logged and logged

    # lineage, both ways
    tags = run.data.tags
    assert tags["ganpipe.data_hash"] == manifest["content_hash"]
    assert tags["ganpipe.dvc_stage"] == "train"
    assert tags["ganpipe.ray_run"].startswith(f"{stack.storage_root}/")
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["ganpipe.git_dirty"] in ("true", "false")
    assert tags["ganpipe.params_hash"]
    card = json.loads((project / "export/model_card.json").read_text())
    assert run_id in json.dumps(card)
    # the registry: candidate, then promote makes it champion (no champion yet)
    name = "ganpipe-generator"
    cand = client.get_model_version_by_alias(name, "candidate")
    assert cand.run_id == run_id
    p = sh(project, sys.executable, "-m", "pipeline.cli", "promote", extra_env=env)
    assert p.stdout.startswith("promoted: "), p.stdout
    assert client.get_model_version_by_alias(name, "champion").version == cand.version

    # no credential value in params, tags, metrics, artifacts (run and model), S3 objects or stage outputs
    records = json.dumps([run.data.params, run.data.tags, run.data.metrics, dict(cand)], default=str)
    assert leaks(records.encode(), secrets) == []
    for key in run.data.metrics:
        assert (
            leaks(json.dumps([m.to_dictionary() for m in client.get_metric_history(run_id, key)]).encode(), secrets)
            == []
        )
    got = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, dst_path=str(tmp_path / "run-art"), tracking_uri=stack.tracking_uri
        )
    )
    model = Path(
        mlflow.artifacts.download_artifacts(
            # resolved through this server's registry (a models:/ URI would use the process-wide
            # registry URI, which earlier tests in the same process may have pointed elsewhere)
            artifact_uri=client.get_model_version_download_uri(name, cand.version),
            dst_path=str(tmp_path / "model-art"),
            tracking_uri=stack.tracking_uri,
        )
    )
    files = [f for d in (got, model) for f in d.rglob("*") if f.is_file()]
    assert any(f.name == "config.json" for f in files) and any(f.suffix == ".onnx" for f in files), files
    for f in files:
        assert leaks(f.read_bytes(), secrets) == [], f
    for k in keys:
        assert leaks(s3.get_object(Bucket=stack.bucket, Key=k)["Body"].read(), secrets) == [], k
    for f in [
        *project.glob("metrics/*.json"),
        project / "export/model_card.json",
        project / "dvc.lock",
        project / ".dvc/config",
    ]:
        assert leaks(f.read_bytes(), secrets) == [], f

    # a DVC remote on the same S3: push, lose cache and outputs, pull them back bit for bit
    sh(project, "dvc", "remote", "add", "-d", "s3remote", f"s3://{stack.bucket}/dvcstore")
    sh(project, "dvc", "remote", "modify", "s3remote", "endpointurl", stack.s3_endpoint_url)
    before = tree_hashes(project)
    assert any(k.startswith("models/") for k in before) and any(k.startswith("export/") for k in before)
    sh(project, "dvc", "push", extra_env=env)
    pushed = s3.list_objects_v2(Bucket=stack.bucket, Prefix="dvcstore/").get("KeyCount", 0)
    assert pushed >= len([k for k in before if not k.startswith("metrics/")]), pushed
    shutil.rmtree(project / ".dvc/cache")
    for top in ("data/prepared", "data/features", "models", "plots", "export"):
        shutil.rmtree(project / top)
    sh(project, "dvc", "pull", extra_env=env)
    assert tree_hashes(project) == before
    status = sh(project, "dvc", "status", extra_env=env)
    assert "up to date" in status.stdout, status.stdout
    assert leaks((project / ".dvc/config").read_bytes(), secrets) == []
