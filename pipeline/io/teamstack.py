"""A local "team stack" on loopback: moto's S3 server + an MLflow tracking server (artifacts on that S3).

For trying team mode on one machine and for tests. Everything listens on 127.0.0.1 only; the S3
credentials are the local stack's own fake ones. Each server runs in its own session (process group),
logs to a file in the work directory, and is stopped by signalling only that group.

    with start_stack(Path("stack")) as stack:      # or: ganpipe stack [--dir D] [--postgres] [--auth]
        os.environ.update(stack.env())
        ...

With auth, the pipeline gets its own non-admin MLflow user (PIPELINE_USERNAME); the admin's password
stays in workdir/basic_auth.ini. No password is ever put on a command line (where `ps` shows it):
servers and helpers get them through 0600 files, the environment or stdin.

`start_postgres(workdir)` starts a throwaway PostgreSQL 15 cluster to back the MLflow server, as a
team would run it; MLflow then needs a PostgreSQL driver (psycopg2 or psycopg) in this environment.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import extras

BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DEFAULT_BUCKET = "ganpipe"
ADMIN_USERNAME = "admin"
# the non-admin MLflow user Stack.env() hands the pipeline when auth is on
PIPELINE_USERNAME = "ganpipe"
# The local stack's own fake S3 credentials (moto accepts any).
LOCAL_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Inherited settings that could point a child at another server, store or account.
_STRIP_PREFIXES = ("MLFLOW_", "AWS_")


class StackError(RuntimeError):
    """A process of the local stack died or did not come up."""


# ---------------------------------------------------------------------------------------------
# processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    # the state follows the command name, which is in parentheses and may contain spaces
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields: state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(d.name))
    return out


@dataclass
class ManagedProcess:
    """A server started in its own session; `pid` is also its process group id."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """The leader and every live process still in its group."""
        members = set(group_members(self.pid))
        if self.running():
            members.add(self.pid)
        return sorted(members)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _signal_group(self, sig: int) -> None:
        pgid = self.pid
        # Signal the group only while it is provably ours: the leader is not reaped yet (its pid
        # cannot be reused), or processes still carry that group id (Linux does not hand out a pid
        # that is in use as a process group id).
        if pgid <= 1:
            return
        if self.running() or group_members(pgid):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None and not group_members(self.pid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL after `timeout`; returns when the whole group is gone."""
        self._signal_group(signal.SIGTERM)
        if not self._wait_gone(timeout):
            self._signal_group(signal.SIGKILL)
            self._wait_gone(10.0)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIP_PREFIXES)}
    env.update(extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> ManagedProcess:
    with open(log, "ab") as fh:
        p = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name, p, log)


def _wait_until(proc: ManagedProcess, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not proc.running():
            raise StackError(
                f"{proc.name} (pid {proc.pid}) exited with code {proc.popen.returncode} before it answered; "
                f"see its log {proc.log}:\n{proc.log_tail()}"
            )
        try:
            if ready():
                return
        except Exception as e:  # noqa: BLE001 - not ready yet
            last = e
        time.sleep(0.2)
    raise StackError(
        f"{proc.name} (pid {proc.pid}) did not answer within {timeout:.0f}s (last error: {last!r}); "
        f"see its log {proc.log}:\n{proc.log_tail()}"
    )


# ---------------------------------------------------------------------------------------------
# the stack


@dataclass
class Stack:
    workdir: Path
    host: str
    s3_endpoint_url: str
    tracking_uri: str
    bucket: str
    artifacts_destination: str
    backend_store_uri: str = field(repr=False)  # may hold a database password
    auth: bool = False
    admin_username: str | None = None
    admin_password: str | None = field(default=None, repr=False)
    pipeline_username: str | None = None
    pipeline_password: str | None = field(default=None, repr=False)
    processes: list[ManagedProcess] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def storage_root(self) -> str:
        """Where Ray checkpoints go (params `storage.root`)."""
        return f"s3://{self.bucket}/ray"

    def env(self) -> dict[str, str]:
        """The environment variables a user of this stack exports."""
        e = {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            # the one endpoint setting the stages read when storage.s3_endpoint_url is unset
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint_url,
            **LOCAL_AWS,
        }
        if self.auth:  # the pipeline's own user: it can track and register, not manage users
            e["MLFLOW_TRACKING_USERNAME"] = self.pipeline_username or PIPELINE_USERNAME
            e["MLFLOW_TRACKING_PASSWORD"] = self.pipeline_password or ""
        return e

    def write_env_file(self, path: Path | None = None) -> Path:
        """Write env() as `export` lines to a shell file (mode 0600; default workdir/env.sh).

        For a user to `source`: printing the exports instead would put the password on screen and
        in terminal scrollback, and pasting them would put it in the shell history.
        """
        path = Path(path) if path is not None else self.workdir / "env.sh"
        lines = ["# the environment for this ganpipe stack: source this file (it holds a password)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        _private_write(path, "\n".join(lines) + "\n")
        return path

    def admin_client(self):
        """MLflow's auth client (users, permissions) signed in as the admin; needs auth."""
        if not self.auth or not self.admin_password:
            raise RuntimeError("this stack runs without auth: it has no admin")
        return _admin_client(self.tracking_uri, self.admin_username or ADMIN_USERNAME, self.admin_password)

    def grant_pipeline_user(self, experiments=(), models=()) -> list[str]:
        """Let the pipeline user edit these experiments and registered models where they exist and it
        cannot edit them yet (made by the admin or another user); returns what it granted.

        A creator manages what it creates, but anything else is only `default_permission` (READ) to
        the pipeline user, which is too little to log a run or register a version.
        """
        return _grant_edit(self.admin_client(), self.pipeline_username or PIPELINE_USERNAME, experiments, models)

    def params(self) -> dict[str, dict[str, str]]:
        """The params.yaml settings that send Ray checkpoints to this stack's S3."""
        return {"storage": {"root": self.storage_root, "s3_endpoint_url": self.s3_endpoint_url}}

    def s3_client(self):
        """A boto3 S3 client for this stack's S3."""
        return s3_client(self.s3_endpoint_url)

    def pids(self) -> list[int]:
        """Every live process of the stack (server leaders and their children)."""
        return sorted({pid for p in self.processes for pid in p.pids()})

    def check(self) -> None:
        """Raise StackError if a server of the stack has exited."""
        if self._stopped:
            return
        for p in self.processes:
            if not p.running():
                raise StackError(
                    f"{p.name} (pid {p.pid}) exited with code {p.popen.returncode}; see its log {p.log}:\n"
                    f"{p.log_tail()}"
                )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the stack's own process groups (MLflow first, then S3). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for p in reversed(self.processes):
            p.stop(timeout)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def s3_client(endpoint: str, **kwargs):
    """A boto3 S3 client for the local stack's endpoint and fake credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=LOCAL_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=LOCAL_AWS["AWS_DEFAULT_REGION"],
        **kwargs,
    )


def _s3_ready(endpoint: str) -> Callable[[], bool]:
    from botocore.config import Config

    client = s3_client(endpoint, config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    return lambda: isinstance(client.list_buckets().get("Buckets"), list)


def _http_ok(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - loopback URL we built
            return r.status == 200

    return ready


def _url_host(host: str) -> str:
    """The host part of a URL that reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def auth_unavailable() -> str | None:
    """Why MLflow's basic-auth app cannot start in this environment (None if it can)."""
    if importlib.util.find_spec("flask_wtf") is None:
        return (
            "MLflow's basic-auth app needs Flask-WTF, which is not installed in this Python environment "
            f"({sys.executable}): pip install 'ganpipe[team]' (or `mlflow[auth]`)"
        )
    return None


def _driver_missing_for(uri: str) -> str | None:
    scheme = uri.split("://", 1)[0]
    if scheme == "postgresql":
        from sqlalchemy.dialects import postgresql

        scheme = f"postgresql+{postgresql.dialect.driver}"
    module = {"postgresql+psycopg2": "psycopg2", "postgresql+psycopg": "psycopg"}.get(scheme)
    if module and importlib.util.find_spec(module) is None:
        package = "psycopg2-binary" if module == "psycopg2" else "psycopg[binary]"
        return f"its driver `{module}` is not installed in this Python environment ({sys.executable}): install `{package}` (`pip install 'ganpipe[team]'` brings psycopg)"
    return None


def _private_write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _secret_file(path: Path) -> str:
    """A random secret kept in `path` (mode 0600), made on first use."""
    if path.exists() and (value := path.read_text().strip()):
        os.chmod(path, 0o600)  # a copy put back by hand may have come with looser rights
        return value
    value = secrets.token_urlsafe(32)
    _private_write(path, value + "\n")
    return value


def _write_auth_config(workdir: Path) -> tuple[Path, str]:
    """workdir/basic_auth.ini with a sqlite auth store in workdir and a generated admin password.

    MLflow creates the admin from `admin_password` only when the auth store has no admin yet, so a
    password already written for this workdir is kept (a second start on the same dir still works).
    """
    ini = workdir / "basic_auth.ini"
    password = None
    if ini.exists() and (workdir / "basic_auth.db").exists():
        cp = configparser.ConfigParser()
        cp.read(ini)
        password = cp.get("mlflow", "admin_password", fallback=None)
    password = password or secrets.token_urlsafe(18)  # MLflow wants >= 12 characters
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{(workdir / 'basic_auth.db').resolve()}\n"
        f"admin_username = {ADMIN_USERNAME}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # cache verified credentials briefly (each check is a deliberately slow password hash); with
        # one worker, password and user changes made through the API take effect at once
        "auth_cache_ttl_seconds = 30\n"
    )
    _private_write(ini, text)
    return ini, password


def _admin_client(tracking_uri: str, username: str, password: str):
    """MLflow's AuthServiceClient with these credentials.

    MLflow's client reads its credentials from the process environment only; the admin's must not go
    there (the pipeline and every child process would inherit them), so this one is given them.
    """
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response

    creds = MlflowHostCreds(tracking_uri, username=username, password=password)

    class AdminClient(AuthServiceClient):
        def _request(self, endpoint, method, *, expected_status: int = 200, **kwargs):
            resp = http_request(creds, endpoint, method, **kwargs)
            if expected_status == 200:  # MLflow < 3.17's verify_rest_response takes no status
                resp = verify_rest_response(resp, endpoint)
            else:
                resp = verify_rest_response(resp, endpoint, expected_status=expected_status)
            return resp.json() if resp.content else {}

        def _lookup(self, endpoint: str, **params) -> dict | None:
            try:
                return self._request(endpoint, "GET", params=params)
            except RestException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise

        def experiment_id(self, name: str) -> str | None:
            found = self._lookup("/api/2.0/mlflow/experiments/get-by-name", experiment_name=name)
            return found["experiment"]["experiment_id"] if found else None

        def registered_model_exists(self, name: str) -> bool:
            return self._lookup("/api/2.0/mlflow/registered-models/get", name=name) is not None

    return AdminClient(tracking_uri)


def _ensure_user(admin, username: str, password: str) -> None:
    """Create a non-admin user with this password, or (a second start on the same workdir) give the
    existing one this password back and take any admin rights away."""
    from mlflow.exceptions import RestException

    try:
        admin.create_user(username, password)
    except RestException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        admin.update_user_password(username, password)
        admin.update_user_admin(username, False)


def _permission(admin, username: str, kind: str, key: str) -> str | None:
    """The user's permission on an experiment (id) or registered model (name); None: none granted."""
    from mlflow.exceptions import RestException

    if hasattr(admin, "get_user_permission"):  # MLflow >= 3.17: the effective permission
        return admin.get_user_permission(username, kind, key).permission
    get = admin.get_experiment_permission if kind == "experiment" else admin.get_registered_model_permission
    try:
        return get(key, username).permission
    except RestException:
        return None


def _grant(admin, username: str, kind: str, key: str, permission: str, had: str | None) -> None:
    if hasattr(admin, "grant_user_permission"):  # MLflow >= 3.17
        admin.grant_user_permission(username, kind, key, permission)
        return
    # MLflow < 3.17: one create/update call per resource kind
    verb = "update" if had is not None else "create"
    noun = "experiment" if kind == "experiment" else "registered_model"
    getattr(admin, f"{verb}_{noun}_permission")(key, username, permission)


def _grant_edit(admin, username: str, experiments, models) -> list[str]:
    granted = []
    wanted = [("experiment", name, admin.experiment_id(name)) for name in experiments]
    wanted += [("registered_model", name, name if admin.registered_model_exists(name) else None) for name in models]
    for kind, name, key in wanted:
        if key is None:  # not made yet: whoever makes it manages it
            continue
        had = _permission(admin, username, kind, key)
        if had not in ("EDIT", "MANAGE"):  # never lower a permission
            _grant(admin, username, kind, key, "EDIT", had)
            granted.append(f"{kind} {name}")
    return granted


def pipeline_defaults() -> tuple[str, str]:
    """(tracking.experiment, export.model_name) as params.yaml has them by default."""
    from pipeline.core.config import ExportConfig, TrackingConfig

    return TrackingConfig.model_fields["experiment"].default, ExportConfig.model_fields["model_name"].default


def start_stack(
    workdir: Path,
    *,
    postgres_uri: str | None = None,
    auth: bool = False,
    host: str = "127.0.0.1",
    bucket: str = DEFAULT_BUCKET,
    workers: int = 1,
    jobs: bool = False,
    timeout: float = 120.0,
    experiments: tuple[str, ...] | None = None,
    models: tuple[str, ...] | None = None,
) -> Stack:
    """Start moto's S3 server and an MLflow server (artifacts proxied to s3://<bucket>/mlflow) on `host`.

    The MLflow backend store is `postgres_uri` if given, else sqlite in workdir/mlflow.db. With
    `auth`, MLflow runs with `--app-name basic-auth`; its admin gets a generated password written to
    workdir/basic_auth.ini (mode 0600), the auth store is workdir/basic_auth.db. The admin then makes
    the pipeline's own non-admin user (Stack.env()), its password kept in workdir/pipeline_user.pw
    (mode 0600), and lets it edit those of `experiments` and registered `models` that already exist
    (default: the pipeline's default experiment and model name; see Stack.grant_pipeline_user).
    """
    extras.need("moto", "team", "the team stack (moto's S3 server)")
    if auth and (why := auth_unavailable()):
        raise RuntimeError(f"cannot start MLflow with basic auth: {why}")
    if postgres_uri and (why := _driver_missing_for(postgres_uri)):
        raise RuntimeError(f"cannot use {postgres_uri.split('://')[0]}:// as MLflow's backend store: {why}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[ManagedProcess] = []
    try:
        s3_port = free_port(host)
        s3_url = f"http://{_url_host(host)}:{s3_port}"
        moto = _spawn(
            "moto S3 server",
            [str(BIN / "moto_server"), "-H", host, "-p", str(s3_port)],
            workdir / "moto.log",
            _child_env(LOCAL_AWS),
            workdir,
        )
        procs.append(moto)

        backend = postgres_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        artifacts = f"s3://{bucket}/mlflow"
        mlflow_port = free_port(host)
        while mlflow_port == s3_port:  # moto may not have bound its port yet
            mlflow_port = free_port(host)
        tracking_uri = f"http://{_url_host(host)}:{mlflow_port}"
        env = _child_env({**LOCAL_AWS, "MLFLOW_S3_ENDPOINT_URL": s3_url})
        # MLflow's background job runner (GenAI scorers, periodic tasks) adds several processes and
        # seconds of start-up; a GAN pipeline does not use it.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if jobs else "false"
        # the backend store URI through the environment (the same as --backend-store-uri), so a
        # database password does not show in `ps`
        env["MLFLOW_BACKEND_STORE_URI"] = backend
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--artifacts-destination",
            artifacts,
            "--host",
            host,
            "--port",
            str(mlflow_port),
            "--workers",
            str(workers),
        ]
        admin_password = None
        if auth:
            ini, admin_password = _write_auth_config(workdir)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
            # the auth app's CSRF protection needs a static key; kept per workdir like the password
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = _secret_file(workdir / "flask_secret_key")
            cmd += ["--app-name", "basic-auth"]
        server = _spawn("MLflow server", cmd, workdir / "mlflow.log", env, workdir)
        procs.append(server)
        # both start at once (MLflow needs S3 only when artifacts move); the bucket exists before
        # MLflow answers, so before anyone can log an artifact
        _wait_until(moto, _s3_ready(s3_url), timeout)
        s3 = s3_client(s3_url)
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
        _wait_until(server, _http_ok(f"{tracking_uri}/health"), timeout)
        pipeline_password = None
        if auth:
            pipeline_password = _secret_file(workdir / "pipeline_user.pw")
            admin = _admin_client(tracking_uri, ADMIN_USERNAME, admin_password)
            _ensure_user(admin, PIPELINE_USERNAME, pipeline_password)
            default_experiment, default_model = pipeline_defaults()
            _grant_edit(
                admin,
                PIPELINE_USERNAME,
                (default_experiment,) if experiments is None else experiments,
                (default_model,) if models is None else models,
            )
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    return Stack(
        workdir=workdir,
        host=host,
        s3_endpoint_url=s3_url,
        tracking_uri=tracking_uri,
        bucket=bucket,
        artifacts_destination=artifacts,
        backend_store_uri=backend,
        auth=auth,
        admin_username=ADMIN_USERNAME if auth else None,
        admin_password=admin_password,
        pipeline_username=PIPELINE_USERNAME if auth else None,
        pipeline_password=pipeline_password,
        processes=procs,
    )


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_driver() -> str | None:
    """The explicit SQLAlchemy scheme for the PostgreSQL driver importable here, or None.

    Explicit because the driver behind a bare `postgresql://` depends on the SQLAlchemy version
    (psycopg2 before 2.1, psycopg 3 from 2.1 on).
    """
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg"
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2"
    return None


def postgres_unavailable(require_driver: bool = True) -> str | None:
    """Why start_postgres cannot work here (None if it can)."""
    for tool in ("initdb", "pg_ctl", "psql", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL 15 server binaries not found ({PG_BIN / tool} is missing)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing (PostgreSQL refuses to run as root)"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` system user (PostgreSQL refuses to run as root)"
    if require_driver and postgres_driver() is None:
        return (
            "no PostgreSQL driver for MLflow/SQLAlchemy in this Python environment "
            f"({sys.executable}): install `psycopg[binary]` (or `psycopg2-binary`)"
        )
    return None


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_user_can_use(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    r = subprocess.run(_as_pg_user(["test", "-x", str(path)]), capture_output=True, cwd="/")
    return r.returncode == 0


def _run_pg(cmd: list[str], what: str, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/")
    r = subprocess.run(_as_pg_user(cmd), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        extra = ""
        if log is not None and log.exists():
            try:
                extra = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            except OSError:
                pass
        raise StackError(f"PostgreSQL: {what} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}{extra}")
    return r


def start_postgres(
    workdir: Path, *, database: str = "mlflow", require_driver: bool = True
) -> tuple[str, Callable[[], None]]:
    """Start a throwaway PostgreSQL 15 cluster; return (SQLAlchemy URI, stop function).

    The cluster lives in workdir/postgres (owned by the `postgres` user when running as root, since
    PostgreSQL refuses to run as root). If that user cannot reach workdir (e.g. under pytest's 0700
    temp dir) or the socket path would be too long, a private directory under the system temp dir is
    used instead (named in workdir/postgres.location) and removed on stop. The server listens on
    127.0.0.1 and a free port only; its unix socket lies inside the cluster directory (mode 0700).
    A role `mlflow` with a generated password owns the database `database`; host connections need
    that password (scram-sha-256). A cluster left in workdir/postgres by an earlier call is started
    again, with its data. The stop function (pg_ctl stop -m fast, then immediate) is idempotent.
    """
    why = postgres_unavailable(require_driver)
    if why:
        raise RuntimeError(f"cannot start PostgreSQL: {why}")
    dialect = postgres_driver() or "postgresql"  # no driver only with require_driver=False
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port("127.0.0.1")

    base = workdir / "postgres"
    owned_tmp = None
    if not _pg_user_can_use(workdir) or len(str(base / "run" / f".s.PGSQL.{port}")) > 100:
        owned_tmp = Path(tempfile.mkdtemp(prefix="ganpipe-pg-"))
        base = owned_tmp
        (workdir / "postgres.location").write_text(f"{base}\n")
    data, run, log = base / "data", base / "run", base / "postgres.log"
    role_pw = base / "mlflow.pw"  # the mlflow role's password, for a restart of this cluster
    reuse = (data / "PG_VERSION").exists() and role_pw.exists()
    if data.exists() and not reuse:
        raise StackError(f"{data} holds an unusable PostgreSQL cluster (no {role_pw.name}): remove {base}")
    base.mkdir(parents=True, exist_ok=True)
    run.mkdir(exist_ok=True)
    os.chmod(base, 0o700)
    pg_ids = None
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        pg_ids = (pw.pw_uid, pw.pw_gid)
        for path in (base, run):
            os.chown(path, *pg_ids)

    started = False

    def pg_ctl_stop(mode: str) -> int:
        cmd = _as_pg_user([str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", mode, "-w", "-t", "30"])
        return subprocess.run(cmd, capture_output=True, cwd="/").returncode

    def stop() -> None:
        nonlocal started
        if started:
            started = False
            if pg_ctl_stop("fast") != 0:
                pg_ctl_stop("immediate")
        if owned_tmp is not None and owned_tmp.exists():
            shutil.rmtree(owned_tmp, ignore_errors=True)

    try:
        if not reuse:
            su_pw = base / "superuser.pw"  # initdb needs one for password auth; nobody needs it after
            _private_write(su_pw, secrets.token_urlsafe(18) + "\n")
            if pg_ids:
                os.chown(su_pw, *pg_ids)
            try:
                _run_pg(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        f"--pwfile={su_pw}",
                        "--auth-local=peer",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-instructions",
                    ],
                    "initdb",
                )
            finally:
                su_pw.unlink(missing_ok=True)
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} "
            f"-c unix_socket_directories={shlex.quote(str(run))} -c unix_socket_permissions=0700"
        )
        started = True
        _run_pg(
            [str(PG_BIN / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60"],
            "pg_ctl start",
            log=log,
            start_new_session=True,
        )
        if reuse:
            password = role_pw.read_text().strip()
        else:
            password = secrets.token_urlsafe(18)
            psql = [str(PG_BIN / "psql"), "-h", str(run), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
            # SQL on stdin, not -c: a command line is visible to every user in `ps`
            sql = f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\n"
            _run_pg([*psql, "-qd", "postgres"], "create role", input=sql)
            _run_pg(
                [*psql, "-qd", "postgres"], "create database", input=f'CREATE DATABASE "{database}" OWNER mlflow;\n'
            )
            _private_write(role_pw, password + "\n")
    except BaseException:
        stop()
        raise
    return f"{dialect}://mlflow:{password}@127.0.0.1:{port}/{database}", stop


# ---------------------------------------------------------------------------------------------
# CLI


def describe(stack: Stack, env_file: Path) -> str:
    """What `ganpipe stack` prints: never a password (the environment is in `env_file`)."""
    who = f" (as the MLflow user {stack.pipeline_username}; the file is mode 0600: it holds the password)"
    lines = [
        f"# environment for this stack{who if stack.auth else ''}:",
        f"source {shlex.quote(str(env_file))}",
        f"# it sets {' '.join(stack.env())}",
    ]
    lines += [
        "",
        "# params (Ray checkpoints on this stack's S3):",
        f"dvc exp run -S storage.root={stack.storage_root} -S storage.s3_endpoint_url={stack.s3_endpoint_url}",
        "# or in params.yaml:",
        "#   storage:",
        f"#     root: {stack.storage_root}",
        f"#     s3_endpoint_url: {stack.s3_endpoint_url}",
        "",
        "# a DVC remote on this stack's S3 (credentials from the AWS_* variables above), with the",
        f"# storage.s3_endpoint_url above set:  ganpipe remote s3://{stack.bucket}/dvc --name team  or by hand:",
        f"#   dvc remote add --local -d team s3://{stack.bucket}/dvc",
        f"#   dvc remote modify --local team endpointurl {stack.s3_endpoint_url}",
        "",
        f"# MLflow UI: {stack.tracking_uri}    logs and stores: {stack.workdir}",
    ]
    if stack.auth:
        lines += [
            f"# the pipeline user {stack.pipeline_username} is no admin: it manages what it creates and reads the rest;",
            f"# the MLflow admin ({stack.admin_username}: users, permissions) has its password in "
            f"{stack.workdir / 'basic_auth.ini'}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ganpipe stack",
        description="Start a local team stack on loopback: moto S3 + an MLflow server with artifacts on it.",
    )
    ap.add_argument("--dir", type=Path, default=None, help="work directory (logs, stores); default: a new temp dir")
    ap.add_argument("--postgres", action="store_true", help="back MLflow with a throwaway PostgreSQL 15 cluster")
    ap.add_argument("--auth", action="store_true", help="MLflow basic auth (users, per-experiment permissions)")
    ap.add_argument("--bucket", default=DEFAULT_BUCKET)
    default_experiment, default_model = pipeline_defaults()
    ap.add_argument(
        "--experiment",
        action="append",
        metavar="NAME",
        help=f"with --auth: an experiment made earlier (e.g. by the admin) that the pipeline user may edit; "
        f"repeatable (default: {default_experiment})",
    )
    ap.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help=f"with --auth: the same for a registered model (default: {default_model})",
    )
    args = ap.parse_args(argv)

    workdir = (args.dir or Path(tempfile.mkdtemp(prefix="ganpipe-stack-"))).resolve()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    stop_pg: Callable[[], None] | None = None
    stack: Stack | None = None
    rc = 0
    try:
        pg_uri = None
        if args.postgres:
            try:
                pg_uri, stop_pg = start_postgres(workdir)
            except RuntimeError as e:
                print(f"ganpipe stack: {e}", file=sys.stderr)
                return 2
        stack = start_stack(
            workdir,
            postgres_uri=pg_uri,
            auth=args.auth,
            bucket=args.bucket,
            experiments=None if args.experiment is None else tuple(args.experiment),
            models=None if args.model is None else tuple(args.model),
        )
        print(describe(stack, stack.write_env_file()), flush=True)
        print("\n# running; Ctrl-C (or SIGTERM) stops it", flush=True)
        while True:
            stack.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    except StackError as e:
        print(f"ganpipe stack: {e}", file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish stopping even if signalled again
        try:
            if stack is not None:
                stack.stop()
            if stop_pg is not None:
                stop_pg()
        finally:
            signal.signal(signal.SIGTERM, old)
    print("ganpipe stack: stopped", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
