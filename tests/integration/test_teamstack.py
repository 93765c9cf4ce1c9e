"""The local team stack (pipeline.teamstack): moto S3 + an MLflow server on loopback, optionally on
PostgreSQL and with basic auth. Every test stops what it started."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.teamstack import (
    PG_BIN,
    Stack,
    auth_unavailable,
    pid_alive,
    postgres_unavailable,
    start_postgres,
    start_stack,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def menv(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """monkeypatch, with no inherited MLflow / AWS settings (they would point at other servers)."""
    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AWS_")):
            monkeypatch.delenv(k)
    return monkeypatch


def use(menv: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        menv.setenv(k, v)


def s3_keys(stack: Stack, prefix: str = "mlflow/") -> list[str]:
    resp = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


def log_run_with_artifact(tracking_uri: str, experiment_id: str, tmp_path: Path, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "lr", "0.0002")
    client.log_metric(run_id, "loss_g", 1.5, step=1)
    f = tmp_path / name
    f.write_text(f"artifact of {run_id}\n")
    client.log_artifact(run_id, str(f), artifact_path="samples")
    client.set_terminated(run_id)
    return run_id


def check_artifact_in_s3(stack: Stack, run_id: str, name: str) -> None:
    keys = s3_keys(stack)
    hits = [k for k in keys if k.endswith(f"/{run_id}/artifacts/samples/{name}")]
    assert hits, keys
    body = stack.s3_client().get_object(Bucket=stack.bucket, Key=hits[0])["Body"].read()
    assert body == f"artifact of {run_id}\n".encode()


def stop_and_check_gone(stack: Stack) -> None:
    pids = stack.pids()
    assert len(pids) >= 2, pids  # at least the two server leaders
    stack.stop()
    assert [p for p in pids if pid_alive(p)] == []
    assert stack.pids() == []
    stack.stop()  # idempotent


def the_round_trip(stack: Stack, menv: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    use(menv, stack.env())
    exp = MlflowClient(tracking_uri=stack.tracking_uri).create_experiment("teamstack")
    run_id = log_run_with_artifact(stack.tracking_uri, exp, tmp_path, "sample.txt")
    check_artifact_in_s3(stack, run_id, "sample.txt")
    run = MlflowClient(tracking_uri=stack.tracking_uri).get_run(run_id)
    assert run.data.params == {"lr": "0.0002"}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server to S3


def test_stack_logs_artifacts_to_s3_and_stops_cleanly(tmp_path: Path, menv: pytest.MonkeyPatch):
    stack = start_stack(tmp_path / "stack")
    try:
        assert stack.backend_store_uri.startswith("sqlite:///")
        assert stack.params() == {"storage": {"root": "s3://ganpipe/ray", "s3_endpoint_url": stack.s3_endpoint_url}}
        assert (stack.workdir / "moto.log").exists() and (stack.workdir / "mlflow.log").exists()
        the_round_trip(stack, menv, tmp_path)
        stop_and_check_gone(stack)
    finally:
        stack.stop()


def test_postgres_cluster_alone(tmp_path: Path):
    """The throwaway cluster itself (no Python driver needed): loopback TCP with the role's password."""
    why = postgres_unavailable(require_driver=False)
    if why:
        pytest.skip(f"PostgreSQL cluster cannot start here: {why}")
    uri, stop = start_postgres(tmp_path / "pg", require_driver=False)
    u = urllib.parse.urlsplit(uri)
    try:
        assert u.hostname == "127.0.0.1" and u.path == "/mlflow" and u.username == "mlflow"
        env = {**os.environ, "PGPASSWORD": urllib.parse.unquote(u.password or "")}
        q = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(u.port), "-U", "mlflow", "-d", "mlflow", "-tAc"]
        out = subprocess.run([*q, "SELECT current_user"], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "mlflow", out.stderr
        bad = subprocess.run(
            [*q, "SELECT 1"], env={**env, "PGPASSWORD": "wrong"}, capture_output=True, text=True, timeout=30
        )
        assert bad.returncode != 0 and "password authentication failed" in bad.stderr
    finally:
        stop()
    stop()  # idempotent
    ready = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(u.port)], capture_output=True)
    assert ready.returncode != 0


def test_stack_on_postgres(tmp_path: Path, menv: pytest.MonkeyPatch):
    why = postgres_unavailable()
    if why:
        pytest.skip(f"PostgreSQL backend unavailable: {why}")
    uri, stop_pg = start_postgres(tmp_path / "pg")
    try:
        stack = start_stack(tmp_path / "stack", postgres_uri=uri)
        try:
            assert stack.backend_store_uri == uri
            the_round_trip(stack, menv, tmp_path)
            stop_and_check_gone(stack)
        finally:
            stack.stop()
    finally:
        stop_pg()


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_stack_with_auth_users_and_experiment_permissions(tmp_path: Path, menv: pytest.MonkeyPatch):
    why = auth_unavailable()
    if why:
        pytest.skip(why)
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    stack = start_stack(tmp_path / "stack", auth=True)
    try:
        ini = stack.workdir / "basic_auth.ini"
        assert ini.stat().st_mode & 0o077 == 0  # the admin password is readable by its owner only
        assert stack.admin_password and stack.admin_password in ini.read_text()
        search = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(search) == 401  # anonymous
        assert http_status(search, ("admin", "not-the-password")) == 401
        assert http_status(search, ("admin", stack.admin_password)) == 200

        env = stack.env()
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
        use(menv, env)
        admin = get_app_client("basic-auth", tracking_uri=stack.tracking_uri)
        pw = {"alice": "alice-password-123", "bob": "bob-password-1234"}
        for user, password in pw.items():
            admin.create_user(user, password)

        def be(user: str) -> None:
            menv.setenv("MLFLOW_TRACKING_USERNAME", user)
            menv.setenv("MLFLOW_TRACKING_PASSWORD", pw[user])

        be("alice")
        exp = MlflowClient(tracking_uri=stack.tracking_uri).create_experiment("alice-exp")

        be("bob")
        with pytest.raises(MlflowException) as refused:
            MlflowClient(tracking_uri=stack.tracking_uri).create_run(exp)
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value

        be("alice")  # the experiment's creator manages it: she grants bob EDIT
        alice = get_app_client("basic-auth", tracking_uri=stack.tracking_uri)
        if hasattr(alice, "create_experiment_permission"):  # MLflow < 3.17's per-resource API
            alice.create_experiment_permission(exp, "bob", "EDIT")
        else:
            alice.grant_user_permission("bob", "experiment", exp, "EDIT")

        be("bob")
        run_id = log_run_with_artifact(stack.tracking_uri, exp, tmp_path, "bob.txt")
        check_artifact_in_s3(stack, run_id, "bob.txt")
        assert MlflowClient(tracking_uri=stack.tracking_uri).get_run(run_id).data.params == {"lr": "0.0002"}
        stop_and_check_gone(stack)
    finally:
        stack.stop()
