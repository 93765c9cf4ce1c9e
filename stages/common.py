"""What every stage shares: the params argument, config loading and the error boundary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from pipeline.core import datasets
from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.objectives import objective
from pipeline.io import outputs, s3, tracking

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating tables" chatter in the terminal
# a server that goes away makes an MLflow call fail within seconds (backoff 1, 2 s), not after
# minutes of retries; the per-step metrics have their own patient sender (tracking.MetricBuffer)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return p


# input paths several stages read; each stage's own outputs are declared in the stage with `path`
INPUTS = {
    "--data": (outputs.PREPARED, "prepared data folder"),
    "--models": (outputs.MODELS, "trained models folder"),
    "--features": (outputs.FEATURES, "feature extractor folder"),
    "--train-metrics": (outputs.TRAIN_METRICS, "train stage metrics"),
    "--eval-metrics": (outputs.EVAL_METRICS, "evaluate stage metrics"),
    "--diagnostics": (outputs.DIAGNOSTICS, "the train stage's stability verdict"),
}


def path(p: argparse.ArgumentParser, flag: str, default: str, what: str) -> None:
    p.add_argument(flag, default=default, help=f"{what} (default: %(default)s)")


def inputs(p: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        path(p, flag, *INPUTS[flag])


def repo_root() -> Path:
    """The repository the embedded defaults (local MLflow store, Ray storage, unsent metrics) belong
    to: DVC's DVC_ROOT, which is the main repository's root also for `dvc exp run --queue` and
    `--temp` runs (they execute in a throwaway copy), else the working folder."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def config(args: argparse.Namespace) -> Config:
    """The validated config, resolved at the edge: the one S3 endpoint (storage.s3_endpoint_url, else
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), handed to MLflow's S3 client and child processes, and a
    relative local storage.root anchored at the repository root (`repo_root`)."""
    cfg = load_config(args.params)
    overrides: dict[str, str] = {}
    endpoint = s3.endpoint_url(cfg.storage.s3_endpoint_url)
    if endpoint != cfg.storage.s3_endpoint_url:
        overrides["storage.s3_endpoint_url"] = endpoint
    root = cfg.storage.root
    if not root.startswith("s3://") and not Path(root).expanduser().is_absolute():
        overrides["storage.root"] = str(repo_root() / root)
    if overrides:
        cfg = load_config(args.params, overrides)
    for k, v in s3.tool_env(endpoint).items():
        os.environ.setdefault(k, v)  # an explicit per-tool variable still wins
    return cfg


def portable(location: str) -> str:
    """A path or URI as written into records: relative to the repository root when under it (no
    absolute machine path in committed files), else as is with credentials removed."""
    root = f"{repo_root()}/"
    for scheme in ("sqlite:///", ""):
        if location.startswith(scheme + root):
            return scheme + location[len(scheme + root) :]
    return tracking.redact(location)


def dvc_experiment() -> dict[str, str]:
    """MLflow tags naming the DVC experiment this stage runs in (`dvc exp run`), if any."""
    names = {"DVC_EXP_NAME": "ganpipe.dvc_exp_name", "DVC_EXP_BASELINE_REV": "ganpipe.dvc_exp_baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def run_label(cfg: Config, key: str, kind: str = "") -> str:
    """A readable MLflow run name: the DVC experiment's name when `dvc exp run` runs the stage, else
    what is trained (dataset, loss, model); then `kind` ("tune") and the run identity's first 8
    characters, so two runs of the same setup still differ by name. Runs are found by their tags,
    never by name."""
    what = os.environ.get("DVC_EXP_NAME") or "-".join(
        [
            cfg.data.name,
            *([cfg.data.target] if objective(cfg.model.family).domains == 2 else []),
            cfg.loss.name,
            cfg.model.arch,
        ]
    )
    return "-".join([what, *([kind] if kind else []), key[:8]])


def check_locations(cfg: Config, *keys: str) -> None:
    """Before any work (and before an MLflow run is opened): every location among `keys`
    ("storage.root", "data.path") must be usable. An s3:// one must be reachable, its bucket must
    exist, and storage.root must take a test write (S3Error naming the key and bucket); a local
    storage.root must be a folder this user can write."""
    where = {"storage.root": cfg.storage.root, "data.path": cfg.data.path}
    data_file = datasets.DATASETS[cfg.data.name].path == "file"  # else a folder (an s3:// prefix)
    for key in keys:
        uri = where[key]
        if uri and uri.startswith("s3://"):
            object_ = key == "data.path" and data_file
            s3.check(uri, key, cfg.storage.s3_endpoint_url, object_=object_, writable=key == "storage.root")
        elif uri and key == "storage.root":
            _check_local_writable(Path(uri), key)


def _check_local_writable(path: Path, key: str) -> None:
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ganpipe-write-probe-"):
            pass
    except OSError as e:
        raise OSError(f"{key}: cannot write to {path} ({e.strerror or e})") from None


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI for this stage, checked to answer before any work starts."""
    uri = tracking.resolve_uri(cfg.tracking.uri, cwd=repo_root())
    tracking.check_reachable(uri)
    return uri


def start_ray(cfg: Config, uri: str) -> str:
    """Start or join Ray (`ray.address`), and refuse a tracking store the cluster's nodes cannot reach
    (before any MLflow run is opened). Returns what was done."""
    from pipeline.ray import distributed

    done = distributed.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    distributed.check_tracking_placement(uri)
    return done


def ship_data(cfg: Config, stage: str, shipped):
    """The workers' data (runtime.WorkerData), its image stores also shipped through storage.root when
    it is on S3 and the Ray cluster has other nodes, which may not share this disk (pipeline.io.store_shipping)."""
    from pipeline.io import store_shipping
    from pipeline.ray import distributed

    root = cfg.storage.root
    others = root.startswith("s3://") and distributed.other_nodes()
    endpoint = s3.endpoint_url(cfg.storage.s3_endpoint_url)
    return store_shipping.ship(shipped, root, endpoint, others, say=lambda m: print(f"[{stage}] {m}", flush=True))


UNSENT_DIR = ".ganpipe/unsent-metrics"


def spill_path(name: str) -> Path:
    """Where a run keeps the metrics the MLflow server never took (absolute: Ray workers and Tune
    trials run in other working folders)."""
    return repo_root() / UNSENT_DIR / f"{name}.jsonl"


def deliver_spilled(stage: str, uri: str, spill: Path) -> None:
    """Send what a run kept in `spill`; warn (naming the file) about what still could not be sent."""
    if left := tracking.deliver_spilled(uri, spill):
        print(
            f"[{stage}] WARNING: {left} metric values never reached the MLflow server at {tracking.redact(uri)}; "
            f"they are kept in {spill} (JSON lines: run_id, key, value, timestamp, step)",
            file=sys.stderr,
        )


def run(body: Callable[[], None]) -> int:
    """Run a stage body; user-facing failures print one line and exit non-zero."""
    try:
        body()
        return 0
    except ConfigError as e:
        print(f"error: invalid params:\n{e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError, OSError) as e:
        print(f"error: {tracking.redact_text(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:
        if not tracking.is_server_error(e):
            raise
        print(f"error: MLflow: {tracking.describe_error(e)}", file=sys.stderr)
        return 1
