"""MLflow: the one module that talks to it.

One MLflow run per training. The stage (driver) creates or finds the run and logs params and final
artifacts; rank 0 of the workers logs per-step metrics into the same run through `MetricBuffer`,
which queues one batch per log tick for a background sender, so logging never blocks the loop and
a tracking server that goes away mid-run loses no step (see MetricBuffer).
A rerun of the same training (same params and data) finds its run by the `ganpipe.run_key` tag and
continues it instead of opening a new one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.core import environment, secrets

RUN_KEY_TAG = "ganpipe.run_key"
# MLflow prints "View run ... at: <tracking URI>" when a run ends: the URI may carry a password, and
# the summary at the end of the pipeline already says where the run is
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def resolve_uri(config_uri: str | None, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.uri, then a local sqlite store in the working dir."""
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    if config_uri:
        return config_uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the server, when an http(s) tracking server does not answer its health check.

    MLflow's own client retries for minutes before giving up; a user deserves one clear line.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    base, _, _ = _endpoint(uri)
    try:
        urllib.request.urlopen(base + "/health", timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # an auth-protected server is up; credentials are checked on use
            raise ConnectionError(f"tracking.uri: MLflow server at {redact(uri)} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"tracking.uri: cannot reach the MLflow server at {redact(uri)} ({reason})") from None
    check_credentials(uri, timeout)


class CredentialsRefused(ConnectionError):
    """The MLflow server answered, and refused who we are (401) or what we may do (403)."""


def check_credentials(uri: str, timeout: float = 5.0, env: dict[str, str] | None = None) -> None:
    """One authenticated call (a one-row experiment search), so that a wrong user or password stops
    the stage before any work, not at its first logged value. Credentials are MLflow's own:
    MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME / _PASSWORD, or user:password@ in the URI."""
    import urllib.error
    import urllib.request

    base, auth, who = _endpoint(uri, env)
    req = urllib.request.Request(
        base + "/api/2.0/mlflow/experiments/search",
        data=b'{"max_results": 1}',
        headers={"Content-Type": "application/json", **auth},
        method="POST",
    )
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:  # any other answer: the server took the credentials
        if e.code == 401:
            raise CredentialsRefused(
                f"tracking.uri: the MLflow server at {redact(uri)} refused the credentials ({who}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to a valid user"
            ) from None
        if e.code == 403:
            raise CredentialsRefused(
                f"tracking.uri: the MLflow server at {redact(uri)} took the credentials ({who}) but denies "
                "them access to experiments"
            ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"tracking.uri: cannot reach the MLflow server at {redact(uri)} ({reason})") from None


def _endpoint(uri: str, env: dict[str, str] | None = None) -> tuple[str, dict[str, str], str]:
    """(the server's base URL without credentials, the Authorization header MLflow's client would
    send, who that is in words). Credentials: MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME /
    _PASSWORD, or user:password@ in the URI (percent-encoded)."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    env = os.environ if env is None else env
    parts = urlsplit(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    if ":" in (parts.hostname or ""):  # an IPv6 literal
        host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if parts.username:
        user, password = unquote(parts.username), unquote(parts.password or "")
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return base, {"Authorization": f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"}, "MLFLOW_TRACKING_TOKEN"
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        return base, {"Authorization": f"Basic {token}"}, f"user {user!r}"
    return base, {}, "no credentials"


def redact(uri: str) -> str:
    """A URI fit for logs: user:password@ and secret query values removed (pipeline.core.secrets)."""
    return secrets.redact(uri)


def redact_text(text: str) -> str:
    """Any text fit for logs: every URI in it without credentials (pipeline.core.secrets)."""
    return secrets.redact(text)


def is_server_error(e: BaseException) -> bool:
    """An error raised by MLflow's client or the HTTP stack under it (a server that failed or refused)."""
    return type(e).__module__.split(".")[0] in ("mlflow", "requests", "urllib3")


def describe_error(e: BaseException) -> str:
    """One line for an MLflow client error: its gist without MLflow's retry chatter, credentials removed."""
    text = " ".join(str(e).split())
    if "Max retries exceeded" in text or "Connection refused" in text or "NewConnectionError" in text:
        text = "the server did not answer (" + (text.split("(Caused by ")[-1].rstrip(")")[:160]) + ")"
    return redact_text(text[:400])


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the local store, not in the cwd of whoever runs
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def start_or_resume_run(
    uri: str, experiment: str, run_key: str, run_name: str, tags: dict[str, str] | None = None
) -> tuple[str, bool]:
    """The id of the latest run tagged with run_key (interrupted or finished), or of a new one;
    and whether it was found. The training it records continues in the same run."""
    client = _client(uri)
    found = find_run(uri, experiment, run_key)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, True
    exp_id = experiment_id(uri, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    return run.info.run_id, False


def find_run(uri: str, experiment: str, run_key: str):
    """The latest MLflow run tagged with run_key (an mlflow Run: its status too), or None."""
    found = _client(uri).search_runs(
        [experiment_id(uri, experiment)],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def lineage_tags(git: dict, data_hash: str, params_hash: str, stage: str, ray_run: str) -> dict[str, str]:
    """Tags that lead from an MLflow run back to everything needed to reproduce it."""
    tags = {
        "ganpipe.data_hash": data_hash,
        "data.content_hash": data_hash,
        "ganpipe.params_hash": params_hash,
        "ganpipe.dvc_stage": stage,
        "ganpipe.ray_run": ray_run,
    }
    if git.get("commit"):
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["ganpipe.git_dirty"] = str(bool(git["dirty"])).lower()
    return tags


def last_step(uri: str, run_id: str, key: str) -> int | None:
    """The last step at which `key` was logged in the run, or None (also when the server is away)."""
    try:
        history = _client(uri).get_metric_history(run_id, key)
    except Exception:  # best effort: it only words a message
        return None
    return max((m.step for m in history), default=None)


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Params (credentials dropped), once per run: a resumed run already has them."""
    from mlflow.entities import Param

    client = _client(uri)
    have = client.get_run(run_id).data.params
    todo = [
        Param(k, redact(str(v))[:6000])
        for k, v in params.items()
        if k not in have and not secrets.SECRET_NAME.search(k)
    ]
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i : i + 100])


def log_dict(uri: str, run_id: str, data: dict[str, Any], name: str) -> None:
    _client(uri).log_dict(run_id, data, name)


def log_artifacts(uri: str, run_id: str, paths: list[str | Path], artifact_path: str | None = None) -> None:
    client = _client(uri)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path)
        elif p.is_file():
            client.log_artifact(run_id, str(p), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


class Interrupted(RuntimeError):
    """A stage stopped by the user (Ctrl-C); its message says how to continue."""


@contextlib.contextmanager
def closing_run(uri: str, run_id: str, finished_before: bool = False):
    """The stage's work on an MLflow run: when it raises, the run is ended FAILED (KILLED when the
    user interrupted), so it never stays RUNNING after the stage exits; a run that was FINISHED
    before (a rerun that hands its training back) stays FINISHED: what it records is still whole.
    One quick attempt: the server may be what failed; then a rerun of the stage finds the run and
    ends it."""
    try:
        yield
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, Interrupted)) else "FAILED"
        status = "FINISHED" if finished_before else status
        try:
            with single_attempt():
                end_run(uri, run_id, status)
        except Exception:  # noqa: BLE001 - best effort; the error that stopped the stage is what matters
            pass
        raise


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of this machine, every
    10 s into the run while the block runs, through its public `start_run(log_system_metrics=True)`.
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns them off. Leaving the block ends MLflow's own
    handle on the run (FINISHED, or FAILED when the block raised; an enclosing `closing_run` then
    says KILLED for an interrupt), in one attempt: a server that is away is the caller's to report."""
    import mlflow

    on = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0")
    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id, log_system_metrics=on)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        try:
            with single_attempt(timeout_s=10):
                mlflow.end_run(status)
        except Exception:  # noqa: BLE001 - the block's own outcome (or error) is what the stage reports
            pass


_ATTEMPT_LOCK = threading.Lock()


@contextlib.contextmanager
def single_attempt(timeout_s: float | None = None):
    """MLflow's client makes one attempt per HTTP request in this block (no retries of its own; with
    `timeout_s`, each request waits at most that long), through its documented
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT variables, restored afterwards.
    They are process-wide: a call another thread makes meanwhile gets one attempt too."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        names["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(timeout_s, 1)))
    with _ATTEMPT_LOCK, environment.temporarily(names):
        yield


def log_summary_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    if batch:
        _client(uri).log_batch(run_id, metrics=batch)


class _Point(NamedTuple):
    """One metric value as MLflow's `Metric` takes it (made without importing MLflow)."""

    key: str
    value: float
    timestamp: int
    step: int


class MetricBuffer:
    """Per-step metrics, delivered in order by one background thread: training never waits on the server.

    `add` collects; `flush` queues what was collected as one batch. The sender thread posts each batch
    with a single attempt; when the server is away (refused connection, timeout, HTTP 429/5xx) it keeps
    the batch, waits with exponential backoff (0.5 s doubling up to 15 s) and tries the same batch
    again, so batches arrive in order and no step is lost while the server comes back. A refusal that
    retrying cannot fix (another 4xx) sets the batch aside at once. `flush(wait=True)` (the end of
    training) waits at most `timeout` seconds for the queue to drain; what is still undelivered then
    is appended to `spill` as JSON lines (one metric a line) and a warning names the file; without a
    `spill` path it is dropped with a warning. Re-sending a batch the server did store is harmless:
    MLflow ignores an identical (key, step, timestamp, value) row.

    The sender thread starts with the buffer and makes MLflow's client itself (importing MLflow and
    opening a SQLite store take seconds): training starts without waiting for it.
    """

    BACKOFF = (0.5, 15.0)

    def __init__(self, uri: str, run_id: str, spill: str | Path | None = None, timeout: float = 120.0, log=print):
        self.uri, self.run_id, self.timeout, self.log = uri, run_id, timeout, log
        self.spill = Path(spill) if spill else None
        self.pending: list = []
        self._queue: list[list] = []  # batches not yet delivered, oldest first
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._warned: set[str] = set()
        self._closed = False
        self.delivered = 0  # metric values the server accepted
        self.spilled = 0  # metric values written to `spill` (or dropped) instead
        self.spill_failed = False  # writing the spill file failed (said once in a warning)
        self._send = None  # made by the sender thread (a failure there is a server that is away)
        # a daemon: it lives as long as the training process, which drains it with flush(wait=True)
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def add(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.pending += [_Point(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self, wait: bool = False) -> None:
        """Queue the collected metrics (never blocks); with `wait`, deliver everything or spill it."""
        with self._cond:
            if self.pending:
                batch, self.pending = self.pending, []
                self._queue += [batch[i : i + 1000] for i in range(0, len(batch), 1000)]
                self._cond.notify_all()
            if not wait:
                return
            deadline = time.monotonic() + self.timeout
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            left, self._queue = self._queue, []
            self._cond.notify_all()
        if left:
            self._set_aside(
                left, f"the MLflow server at {redact(self.uri)} did not take them within {self.timeout:.0f}s"
            )

    def wait_sent(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for everything queued to be delivered, unless the server is
        already known to be away (then return at once); nothing is set aside. True when delivered."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and self._down_since is None and time.monotonic() < deadline:
                self._cond.wait(timeout=max(deadline - time.monotonic(), 0.01))
            return not self._queue

    def close(self) -> None:
        """`flush(wait=True)`, then end the sender thread (a process that runs many trainings, such
        as a reused Tune trial process, closes each buffer instead of keeping its thread)."""
        self.flush(wait=True)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ---- the sender thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.BACKOFF[0]
        try:
            self._send = self._send_with()
        except Exception:  # noqa: BLE001 - tried again with the first batch, which says why
            pass
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed, and everything delivered or set aside
                    return
                batch = self._queue[0]
            try:
                if self._send is None:
                    self._send = self._send_with()
                ok = self._send(batch)
            except Exception as e:  # noqa: BLE001 - any failure to deliver is "try again later"
                ok = None
                if self._down_since is None:
                    with self._cond:
                        self._down_since = time.monotonic()
                        self._cond.notify_all()  # wait_sent stops waiting
                    self.log(
                        f"[mlflow] warning: the server at {redact(self.uri)} is not answering ({type(e).__name__}); "
                        "metrics are kept and sent when it returns, training goes on",
                        flush=True,
                    )
            if ok is None:
                time.sleep(delay)
                delay = min(delay * 2, self.BACKOFF[1])
                continue
            delay = self.BACKOFF[0]
            with self._cond:
                if self._queue and self._queue[0] is batch:
                    self._queue.pop(0)
                self._cond.notify_all()
            if ok is True:
                self.delivered += len(batch)
                if self._down_since is not None:
                    self.log(
                        f"[mlflow] the server at {redact(self.uri)} is back after "
                        f"{time.monotonic() - self._down_since:.0f}s; buffered metrics delivered",
                        flush=True,
                    )
                    self._down_since = None
            else:
                self._set_aside([batch], ok)

    def _send_with(self):
        """The sender: MLflow's public client, one attempt per batch (the buffer does its own
        retrying): True, or the reason the server refused the batch for good (a 4xx other than
        429); a server that is away (no answer, HTTP 429 or 5xx) raises ConnectionError."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        client = _client(self.uri)
        remote = self.uri.startswith(("http://", "https://"))

        def send(points: list) -> bool | str:
            batch = [Metric(*p) for p in points]
            if not remote:
                client.log_batch(self.run_id, metrics=batch)
                return True
            try:
                with single_attempt(timeout_s=10):
                    client.log_batch(self.run_id, metrics=batch)
            except MlflowException as e:
                status = e.get_http_status_code()
                if status == 429 or status >= 500:  # also no answer at all (MLflow words it as 500)
                    raise ConnectionError(describe_error(e)) from None
                return f"the server refused them (HTTP {status}: {describe_error(e)[:200]})"
            return True

        return send

    def _set_aside(self, batches: list[list], why: str) -> None:
        n = sum(len(b) for b in batches)
        self.spilled += n
        if self.spill is not None:
            try:
                write_spill(self.spill, self.run_id, [m for b in batches for m in b])
            except OSError as e:  # the sender goes on; the loss is said once, naming the file
                why = f"{why}; and writing {self.spill} failed: {e}"
                self.spill_failed = True
        if why in self._warned:  # one warning per reason, not one per log tick
            return
        self._warned.add(why)
        kept = f"; they are kept in {self.spill}" if self.spill is not None and not self.spill_failed else ""
        self.log(f"[mlflow] warning: {n} metric values were not logged ({why}){kept}", flush=True)


def write_spill(path: Path, run_id: str, metrics: list) -> None:
    """Append metrics to a JSON-lines file (one metric a line)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for m in metrics:
            row = {"run_id": run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
            fh.write(json.dumps(row) + "\n")


def _read_spill(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """(metric rows, [(line number, text)] of the lines that are not one)."""
    import json

    rows, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            float(r["value"]), int(r["step"]), int(r["timestamp"]), str(r["key"]), str(r["run_id"])
            rows.append(r)
        except (ValueError, TypeError, KeyError):
            bad.append((i, line))
    return rows, bad


def deliver_spilled(uri: str, path: str | Path, log=None) -> int:
    """Send the metrics kept in a spill file (see MetricBuffer); remove the file when all are logged.
    Returns how many are still undelivered (0 when there was no file). Unreadable lines (a file cut
    short by a crash, or damaged) are reported naming the file, moved to `<file>.corrupt`, and skipped.
    """
    import json
    import sys

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    from mlflow.entities import Metric

    path = Path(path)
    if not path.is_file():
        return 0
    rows, bad = _read_spill(path)
    if bad:  # a truncated or corrupt file: the readable lines still go; the others are kept apart
        corrupt = path.with_name(path.name + ".corrupt")
        with open(corrupt, "a") as fh:
            fh.writelines(line + "\n" for _, line in bad)
        log(
            f"[mlflow] warning: {path}: {len(bad)} line(s) unreadable (first: line {bad[0][0]}), skipped; "
            f"kept in {corrupt}"
        )
        if rows:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            path.unlink()
            return 0
    try:
        check_reachable(uri)  # one quick look, not MLflow's minutes of retries
    except ConnectionError:
        return len(rows)
    by_run: dict[str, list] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
    try:
        client = _client(uri)
        for run_id, metrics in by_run.items():
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i : i + 1000])
    except Exception:  # noqa: BLE001 - still unreachable: keep the file
        return len(rows)
    path.unlink()
    return 0


def log_onnx_model(
    uri: str,
    run_id: str,
    onnx_path: str | Path,
    registered_name: str,
    name: str = "generator",
    example: dict[str, Any] | None = None,
    torch_model: Any = None,
) -> str:
    """Log an ONNX generator as the MLflow model `name` in `run_id`, register it with the alias
    `candidate`; returns models:/name/version. With `example` (named input tensors: z, and y for
    conditional generators) and the PyTorch `torch_model` that computes them, the model carries a
    signature and an input example, and the PyTorch generator is logged beside it as `<name>_pytorch`
    in torch.export's format (not registered: the ONNX file is what the registry serves)."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    _client(uri)
    graph = onnx.load(str(onnx_path))
    signature, inputs, output = None, None, None
    if example is not None and torch_model is not None:
        import torch

        inputs = {k: v.numpy() for k, v in example.items()}
        torch_model.eval()
        with torch.no_grad():
            output = torch_model(*example.values()).numpy()
        # the output named as the ONNX graph names it (x): the model's predict returns {name: array}
        signature = infer_signature(inputs, {graph.graph.output[0].name: output})
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            graph,
            name=name,
            registered_model_name=registered_name,
            signature=signature,
            input_example=inputs,
            pip_requirements=["onnx", "onnxruntime"],  # skip MLflow's slow requirement inference
        )
        # the PyTorch generator in torch.export's format (pt2: loading it runs no pickled code), which
        # MLflow supports for one input: conditional generators (z, y) are served by the ONNX model only
        if torch_model is not None and inputs is not None and len(inputs) == 1:
            (first,) = inputs.values()
            try:
                mlflow.pytorch.log_model(
                    torch_model,
                    name=f"{name}_pytorch",
                    input_example=first,
                    signature=infer_signature(first, output),
                    serialization_format="pt2",
                    pip_requirements=["torch"],
                )
            except Exception as e:  # noqa: BLE001 - an extra beside the registered ONNX model
                print(f"[mlflow] warning: the PyTorch generator was not logged ({type(e).__name__}: {e})"[:300])
    version = info.registered_model_version
    _client(uri).set_registered_model_alias(registered_name, "candidate", version)
    return f"models:/{registered_name}/{version}"


def nested_run(
    uri: str, experiment_id: str, parent_run_id: str, trial_id: str, name: str, params: dict, tags: dict | None = None
) -> str:
    """The MLflow run of one sweep trial, nested under the sweep's run; created (with its sampled
    params and `tags`) on the trial's first start, found again after a restore or a PBT exploit."""
    client = _client(uri)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`ganpipe.trial_id` = '{trial_id}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_run_id, "ganpipe.trial_id": trial_id, **(tags or {})},
    )
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> run id for the nested runs of a sweep."""
    client = _client(uri)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10_000
    )
    return {r.data.tags.get("ganpipe.trial_id", r.info.run_id): r.info.run_id for r in runs}
