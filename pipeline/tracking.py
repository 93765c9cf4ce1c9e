"""MLflow: the one module that talks to it.

One MLflow run per training. The stage (driver) creates or finds the run and logs params and final
artifacts; rank 0 of the workers logs per-step metrics into the same run through `MetricBuffer`,
which sends one batched, asynchronous request per log tick so logging never blocks the loop.
A rerun of the same training (same params and data) finds its run by the `ganpipe.run_key` tag and
continues it instead of opening a new one.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

RUN_KEY_TAG = "ganpipe.run_key"
_SECRET = re.compile(r"(secret|password|token|credential|access_key|key_id)", re.I)


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

    url = uri.rstrip("/") + "/health"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # an auth-protected server is up; credentials are checked on use
            raise ConnectionError(f"tracking.uri: MLflow server at {redact(uri)} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"tracking.uri: cannot reach the MLflow server at {redact(uri)} ({reason})") from None


def redact(uri: str) -> str:
    """A URI fit for logs: user:password@ removed."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


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
    exp_id = experiment_id(uri, experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    return run.info.run_id, False


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


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Params (credentials dropped), once per run: a resumed run already has them."""
    from mlflow.entities import Param

    client = _client(uri)
    have = client.get_run(run_id).data.params
    todo = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in have and not _SECRET.search(k)]
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


def log_summary_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    if batch:
        _client(uri).log_batch(run_id, metrics=batch)


class MetricBuffer:
    """Collects per-step metrics; `flush()` sends them in one asynchronous batch."""

    def __init__(self, uri: str, run_id: str):
        self.client = _client(uri)
        self.run_id = run_id
        self.pending: list = []
        self.futures: list = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self, wait: bool = False) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            for i in range(0, len(batch), 1000):
                self.futures.append(self.client.log_batch(self.run_id, metrics=batch[i : i + 1000], synchronous=False))
        if wait:
            for f in self.futures:
                if f is not None:
                    f.wait()
            self.futures = []


def log_onnx_model(
    uri: str, run_id: str, onnx_path: str | Path, registered_name: str, name: str = "generator"
) -> str:
    """Log an ONNX generator as the MLflow model `name` in `run_id`, register it with the alias
    `candidate`; returns models:/name/version."""
    import mlflow
    import onnx

    _client(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name=name,
            registered_model_name=registered_name,
            pip_requirements=["onnx", "onnxruntime"],  # skip MLflow's slow requirement inference
        )
    version = info.registered_model_version
    _client(uri).set_registered_model_alias(registered_name, "candidate", version)
    return f"models:/{registered_name}/{version}"


def nested_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str, name: str, params: dict) -> str:
    """The MLflow run of one sweep trial, nested under the sweep's run; created (with its sampled
    params) on the trial's first start, found again after a restore or a PBT exploit."""
    client = _client(uri)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`ganpipe.trial_id` = '{trial_id}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, "ganpipe.trial_id": trial_id}
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
