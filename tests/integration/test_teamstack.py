"""The local team stack (pipeline.io.teamstack): moto S3 + an MLflow server on loopback, optionally on
PostgreSQL and with basic auth (the pipeline as its own non-admin user). No password on a command
line. Every test stops what it started."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.io import teamstack
from pipeline.io.teamstack import (
    PG_BIN,
    PIPELINE_USERNAME,
    Stack,
    auth_unavailable,
    describe,
    pid_alive,
    pipeline_defaults,
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
        assert env["MLFLOW_TRACKING_USERNAME"] == PIPELINE_USERNAME  # not the admin
        use(menv, env)
        admin = stack.admin_client()
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


# ---------------------------------------------------------------------------------------------
# the pipeline's own MLflow user; no password on a command line


def tiny_onnx(path: Path) -> Path:
    """A one-node ONNX "generator" (z -> z), enough to register a model version."""
    import onnx
    from onnx import TensorProto, helper

    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 2])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["z"], ["x"])], "g", [z], [x])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def pipeline_mlflow_operations(uri: str, tmp_path: Path, experiment: str, model: str) -> str:
    """What the stages do in MLflow, through the pipeline's own functions: experiment (made or
    found), a run with params, tags, metrics and artifacts, a nested trial run, the ONNX generator
    registered with the alias `candidate`, and `promote` moving `champion`. Returns the run id."""
    from pipeline.io import registry, tracking

    run_id, _ = tracking.start_or_resume_run(uri, experiment, f"key-{experiment}", "train", tags={"ganpipe.x": "1"})
    exp_id = tracking.experiment_id(uri, experiment)
    tracking.log_params(uri, run_id, {"train.lr": 0.0002, "train.steps": 300})
    tracking.set_tags(uri, run_id, {"ganpipe.dvc_stage": "train"})
    tracking.log_summary_metrics(uri, run_id, {"eval/w1": 0.5}, step=300)
    (tmp_path / "art").mkdir(exist_ok=True)
    (tmp_path / "art" / "history.csv").write_text("step,loss\n1,0.5\n")
    tracking.log_artifacts(uri, run_id, [tmp_path / "art"], "models")
    trial = tracking.nested_run(uri, exp_id, run_id, "t0", "trial-0", {"train.lr": 0.001})
    tracking.log_summary_metrics(uri, trial, {"eval/w1": 0.7})
    tracking.end_run(uri, trial)
    assert tracking.child_runs(uri, exp_id, run_id) == {"t0": trial}
    version = tracking.log_onnx_model(uri, run_id, tiny_onnx(tmp_path / "g.onnx"), model)
    promoted, why = registry.promote(uri, model, "eval/w1", "min")
    assert promoted or "already the champion" in why, why
    tracking.end_run(uri, run_id)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert client.get_model_version_by_alias(model, "champion").version == version.rsplit("/", 1)[1]
    assert client.get_run(run_id).data.tags["ganpipe.dvc_stage"] == "train"
    return run_id


def test_pipeline_user_tracks_and_registers_but_is_no_admin(tmp_path: Path, menv: pytest.MonkeyPatch):
    """Stack.env() is a non-admin user that can do all the pipeline does in MLflow, cannot manage
    users, keeps its password on a second start, and gets EDIT on the admin's experiment and model."""
    why = auth_unavailable()
    if why:
        pytest.skip(why)
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "stack"
    experiment, model = pipeline_defaults()  # what start_stack lets the pipeline user edit
    stack = start_stack(workdir, auth=True)
    try:
        env = stack.env()
        password = env["MLFLOW_TRACKING_PASSWORD"]
        pw_file = workdir / "pipeline_user.pw"
        assert env["MLFLOW_TRACKING_USERNAME"] == PIPELINE_USERNAME != stack.admin_username
        assert pw_file.stat().st_mode & 0o077 == 0 and pw_file.read_text().strip() == password
        assert len(password) >= 12 and password != stack.admin_password
        assert stack.admin_password not in repr(stack) + str(env)
        assert "default_permission = READ" in (workdir / "basic_auth.ini").read_text()
        search = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(search, (PIPELINE_USERNAME, "not-the-password")) == 401
        assert http_status(search, (PIPELINE_USERNAME, password)) == 200

        use(menv, env)
        uri = stack.tracking_uri
        pipeline_mlflow_operations(uri, tmp_path, "team", "team-generator")
        assert stack.grant_pipeline_user(["team"], ["team-generator"]) == []  # it manages them: never lowered

        me = AuthServiceClient(uri)  # MLflow's auth client, as the pipeline user
        for admin_only in (
            lambda: me.create_user("eve", "eve-password-1234"),
            lambda: me.update_user_admin(PIPELINE_USERNAME, True),
            lambda: me.update_user_password(stack.admin_username, "taken-over-12345"),
        ):
            with pytest.raises(MlflowException) as refused:
                admin_only()
            assert refused.value.error_code == "PERMISSION_DENIED", refused.value
        assert http_status(search, (stack.admin_username, stack.admin_password)) == 200

        # the admin makes the pipeline's default experiment and model: READ to the pipeline user
        use(menv, {"MLFLOW_TRACKING_USERNAME": stack.admin_username, "MLFLOW_TRACKING_PASSWORD": stack.admin_password})
        as_admin = MlflowClient(tracking_uri=uri)
        admins_exp = as_admin.create_experiment(experiment)
        as_admin.create_registered_model(model)
        use(menv, env)
        with pytest.raises(MlflowException) as refused:
            MlflowClient(tracking_uri=uri).create_run(admins_exp)
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value
        stack.stop()

        # a second start on the same workdir: the same user and password, now with EDIT on both
        stack = start_stack(workdir, auth=True)
        again = stack.env()
        assert (again["MLFLOW_TRACKING_USERNAME"], again["MLFLOW_TRACKING_PASSWORD"]) == (PIPELINE_USERNAME, password)
        use(menv, stack.env())
        run_id = pipeline_mlflow_operations(stack.tracking_uri, tmp_path, experiment, model)
        assert MlflowClient(tracking_uri=stack.tracking_uri).get_run(run_id).info.experiment_id == admins_exp
        stop_and_check_gone(stack)
    finally:
        stack.stop()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_no_password_of_the_stack_on_any_command_line(backend: str, tmp_path: Path, menv: pytest.MonkeyPatch):
    """Every secret the stack makes (admin, pipeline user, Flask key, PostgreSQL roles) is kept off
    every command line: the helpers it ran, its live processes (/proc/<pid>/cmdline) and what
    `ganpipe stack` prints; the env file it prints `source` for is 0600 and works."""
    why = auth_unavailable() or (postgres_unavailable() if backend == "postgres" else None)
    if why:
        pytest.skip(why)
    argvs: list[list[str]] = []
    secrets: set[str] = set()

    class RecordingPopen(subprocess.Popen):
        def __init__(self, args, *a, **kw):
            argvs.append([str(x) for x in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)])
            super().__init__(args, *a, **kw)

    real_write = teamstack._private_write

    def recording_write(path: Path, text: str) -> None:
        if len(text.strip().splitlines()) == 1:  # a file that holds one secret (ini and env.sh repeat them)
            secrets.add(text.strip())
        real_write(path, text)

    menv.setattr(subprocess, "Popen", RecordingPopen)
    menv.setattr(teamstack, "_private_write", recording_write)

    stop_pg = None
    uri = None
    if backend == "postgres":
        uri, stop_pg = start_postgres(tmp_path / "pg")
        secrets.add(urllib.parse.unquote(urllib.parse.urlsplit(uri).password or ""))
    try:
        stack = start_stack(tmp_path / "stack", postgres_uri=uri, auth=True)
        try:
            env_file = stack.write_env_file()
            printed = describe(stack, env_file)
            secrets |= {stack.admin_password, stack.pipeline_password}
            assert len(secrets) == 3 + 2 * (backend == "postgres") and all(len(x) >= 12 for x in secrets), secrets

            pids = stack.pids()
            assert len(pids) >= 3, pids  # moto, mlflow server and its uvicorn worker(s)
            lines = {pid: cmdline(pid) for pid in pids}
            lines |= {int(d.name): cmdline(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()}
            assert any(b"uvicorn" in c or b"gunicorn" in c for c in lines.values()), lines
            for secret in secrets:
                assert [pid for pid, c in lines.items() if secret.encode() in c] == []
                assert [a for a in argvs if any(secret in x for x in a)] == []
                assert secret not in printed

            assert f"source {env_file}" in printed and "MLFLOW_TRACKING_PASSWORD" in printed
            assert env_file.stat().st_mode & 0o077 == 0
            sourced = subprocess.run(
                ["bash", "-c", 'source "$1" && env', "bash", str(env_file)],
                env={"PATH": os.environ["PATH"]},
                capture_output=True,
                text=True,
                timeout=30,
            )
            got = dict(line.split("=", 1) for line in sourced.stdout.splitlines() if "=" in line)
            assert {k: got.get(k) for k in stack.env()} == stack.env()
            stop_and_check_gone(stack)
        finally:
            stack.stop()
    finally:
        if stop_pg is not None:
            stop_pg()
    assert argvs  # the recording saw the helpers and servers


def test_ganpipe_stack_prints_a_source_line_not_the_password(tmp_path: Path):
    """`ganpipe stack --auth`: the printed settings name an env file to source, never a password;
    SIGTERM stops the stack."""
    why = auth_unavailable()
    if why:
        pytest.skip(why)
    workdir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    cli = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "stack", "--dir", str(workdir), "--auth"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    out = ""
    try:
        deadline = time.monotonic() + 180
        while "# running" not in out and time.monotonic() < deadline:
            if select.select([cli.stdout], [], [], 1.0)[0]:  # raw reads: a buffered reader hides data from select
                chunk = os.read(cli.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk.decode(errors="replace")
        assert "# running" in out, out
        env_file = workdir / "env.sh"
        assert f"source {env_file}" in out
        assert env_file.stat().st_mode & 0o077 == 0
        pipeline_pw = (workdir / "pipeline_user.pw").read_text().strip()
        assert f"export MLFLOW_TRACKING_PASSWORD={pipeline_pw}" in env_file.read_text()
        assert f"MLFLOW_TRACKING_USERNAME={PIPELINE_USERNAME}" in env_file.read_text()
        admin_pw = next(
            line.split("=", 1)[1].strip()
            for line in (workdir / "basic_auth.ini").read_text().splitlines()
            if line.startswith("admin_password")
        )
        assert pipeline_pw not in out and admin_pw not in out and admin_pw not in env_file.read_text()
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGTERM)
        try:
            rest = cli.communicate(timeout=60)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            cli.kill()
            rest = cli.communicate()[0].decode(errors="replace")
    assert cli.returncode == 0, out + rest
    assert "stopped" in rest
