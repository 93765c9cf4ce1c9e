"""Ray: starting or joining a cluster and running the training loop under Ray Train.

The driver calls `fit`; each worker runs `_worker_loop`: a `runtime.Worker` (the data, the GAN, its
restore and checkpoints, shared with Tune trials) whose training loop gets hooks that average
gradients over the gloo/NCCL process group Ray Train set up, report checkpoints to Ray, and (rank 0
only) log metrics to MLflow, run the live evaluation and print progress.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core import environment, monitor
from pipeline.core.collectives import Collectives
from pipeline.core.config import Config, build_config
from pipeline.ray import runtime
from pipeline.ray.runtime import WorkerData

# Ray's own chatter (usage stats, V2 tips, per-run banners) is noise for our users.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS_SKIP_REGEX": "State API may be temporarily unavailable|^Reporting training result|Checkpoint successfully created",
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints reach the terminal once, not twice
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune: no experiment banner or tables (verbose=0 is honoured)
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # the controller learns of reported checkpoints when it polls the workers; a worker lost before
    # the next poll loses its latest checkpoints to the restart (default 2 s)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def ensure_ray(address: str | None, num_cpus: int | None) -> str:
    """Join `address` (or $RAY_ADDRESS) if given, else start a local Ray. Returns what was done."""
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return "already running"
    address = address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **common)
        return f"joined Ray cluster at {address}"
    _start_own_ray(num_cpus, common)
    return f"started local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def tracking_placement_problem(uri: str, here: str, node_ips: list[str]) -> str | None:
    """Why `uri` cannot serve a cluster whose nodes are at `node_ips` (this driver at `here`), or None.

    Rank 0 of a training, and every Tune trial, logs from whichever node Ray puts it on. A file
    store (sqlite, file:, a path) or a server on loopback exists on this machine only: from another
    node, metrics would land on that node's disk, or nowhere.
    """
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    local_file = parsed.scheme in ("", "file", "sqlite") or len(parsed.scheme) == 1  # a Windows drive
    loopback = (parsed.hostname or "") in ("localhost", "::1") or (parsed.hostname or "").startswith("127.")
    others = sorted({ip for ip in node_ips if ip != here})
    if not others or not (local_file or loopback):
        return None
    from pipeline.core.secrets import redact

    what = "a file on this machine" if local_file else "a server on this machine's loopback"
    return (
        f"tracking.uri: {redact(uri)} is {what}, but the Ray cluster has nodes at {', '.join(others)}, where "
        "rank 0 or a trial may run and could not log to it; set tracking.uri to an MLflow server every node "
        "reaches (http://<host>:5000; `ganpipe stack` starts one)"
    )


def check_tracking_placement(uri: str) -> None:
    """`tracking_placement_problem` for the Ray cluster this process is connected to (an error)."""
    import ray

    nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    problem = tracking_placement_problem(uri, ray.util.get_node_ip_address(), nodes)
    if problem:
        raise ValueError(problem)


def _start_own_ray(num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    """A local Ray of our own, never one that `ray start` or another pipeline runs on this machine
    (address "local"). Its processes are told its address up front: Ray Train's helper actors look
    their cluster up by address, and with two local Rays on one machine (two pipelines from two
    clones) they would otherwise fail with "Found multiple active Ray instances"."""
    import socket

    import ray

    # our own Ray: no token warning, no ~/.ray/auth_token written. A cluster joined by address keeps
    # the user's RAY_AUTH_MODE / RAY_AUTH_TOKEN (docs/distributed.md)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    own = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
    with environment.temporarily(own):  # inherited by the Ray processes started now, not kept by this process
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        except Exception as e:  # Ray's own start-up failures are bare Exceptions ("timed out during startup")
            from pipeline.io.outputs import gist

            raise RuntimeError(
                f"ray: the local Ray did not start ({gist(e)}); on a loaded machine retry, or join a running "
                "cluster with ray.address"
            ) from None


def plan_gpu(setting: str | bool, num_workers: int, gpus: float) -> tuple[bool, str | None]:
    """(train on GPUs?, a note for the user or None) for `train.use_gpu` and a cluster with `gpus`.

    Each worker takes one whole GPU (two NCCL ranks cannot share one), so GPUs are used only when
    there is one per worker: `auto` falls back to CPU with a note rather than asking Ray for GPUs that
    do not exist (it would wait for them for ever), and `true` is refused with one line.
    """
    if setting is False:
        return False, None
    if gpus >= num_workers:  # num_workers >= 1, so there are GPUs
        return True, None
    if setting is True:
        raise ValueError(
            f"train.use_gpu: true needs one GPU per worker: train.num_workers is {num_workers}, "
            f"the Ray cluster has {gpus:g} GPU(s); lower train.num_workers or set train.use_gpu: false"
        )
    if gpus < 1:
        return False, None
    return False, (
        f"train.use_gpu: auto: the Ray cluster has {gpus:g} GPU(s) for {num_workers} workers (one each is needed); "
        "training on CPU. Set train.num_workers to at most the GPUs to use them"
    )


def resolve_use_gpu(cfg: Config) -> bool:
    """`plan_gpu` for this cluster, printing its note; refuses what cannot run on GPUs."""
    import ray

    from pipeline.core.config import check_on_gpu

    use, note = plan_gpu(cfg.train.use_gpu, cfg.train.num_workers, ray.cluster_resources().get("GPU", 0))
    if note:
        print(f"[train] {note}", flush=True)
    if use:
        check_on_gpu(cfg)
    return use


def node_id() -> str:
    """The Ray node this process runs on (a trial's `ganpipe.node` tag: where it first ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def other_nodes() -> bool:
    """Whether the Ray cluster this process is connected to has live nodes besides this one."""
    import ray

    return any(n.get("Alive") and n["NodeID"] != node_id() for n in ray.nodes())


def check_tracking_here(uri: str, who: str) -> None:
    """A trial, or rank 0 of a training, reaches the MLflow server with the credentials of its own
    process, which on a cluster has the environment of the `ray start` that started its node, not the
    driver's: say so on its first request rather than with MLflow's bare 401. A server that is away is
    not an error here (the metrics wait for it: tracking.MetricBuffer)."""
    import ray

    from pipeline.io import tracking

    if not uri.startswith(("http://", "https://")):
        return
    try:
        tracking.check_credentials(uri)
    except tracking.CredentialsRefused as e:
        where = f"Ray node {node_id()[:12]}" if ray.is_initialized() else "its Ray node"
        raise ConnectionError(
            f"{e} (from {who} on {where}: a Ray worker runs in the environment its node was started with; "
            "start every node's `ray start` with the MLflow credentials exported)"
        ) from None
    except ConnectionError:
        pass


def storage_filesystem(root: str, endpoint_url: str | None, skip_unchanged: bool = False):
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig.

    Local roots become absolute paths. For s3:// roots the endpoint is given to pyarrow
    explicitly (it does not read AWS_ENDPOINT_URL), with retries on transient errors.
    `skip_unchanged` (a sweep: Tune snapshots its whole folder again and again): writes of bytes
    already sent to a path are not sent again (pipeline.io.unchanged_uploads). Ray writes that
    filesystem from pyarrow's I/O threads, so its S3 writes are sent by the writing thread.
    """
    if not root.startswith("s3://"):
        return str(Path(root).expanduser().resolve()), None
    from pipeline.io import s3
    from pipeline.io.unchanged_uploads import skipping_unchanged

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    path = root[len("s3://") :].rstrip("/")
    if skip_unchanged:
        return path, skipping_unchanged(s3.arrow_filesystem(endpoint_url, region, background_writes=False))
    return path, s3.arrow_filesystem(endpoint_url, region)


def run_lease(root: str, endpoint_url: str | None, name: str, what: str):
    """The lease (pipeline.io.lease) on the Ray run `name` under storage root `root`."""
    import pyarrow.fs as pafs

    from pipeline.io.lease import Lease

    storage_path, fs = storage_filesystem(root, endpoint_url)
    return Lease(fs or pafs.LocalFileSystem(), f"{storage_path}/{name}", what)


def run_address(root: str, name: str) -> str:
    """Where Ray keeps a run: the identity of a training across reruns."""
    if root.startswith("s3://"):
        return f"{root.rstrip('/')}/{name}"
    return str(Path(root).expanduser().resolve() / name)


def latest_checkpoint_step(root: str, endpoint_url: str | None, name: str) -> int | None:
    """The step of the checkpoint a rerun of the Ray run `name` under `root` resumes from (the latest
    one Ray Train registered, from its checkpoint manager snapshot), or None when there is none."""
    import json

    import pyarrow.fs as pafs

    storage_path, fs = storage_filesystem(root, endpoint_url)
    fs = fs or pafs.LocalFileSystem()
    try:
        with fs.open_input_stream(f"{storage_path}/{name}/{_RAY_SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except Exception:  # best effort: it only words a message (no snapshot, an older Ray's layout)
        return None


_RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """What the driver hands to every worker (plain data: it crosses process boundaries)."""

    cfg: dict[str, Any]
    data_ref: Any  # ray.ObjectRef of a runtime.WorkerData
    tracking_uri: str
    run_id: str
    fit_id: str  # one per fit() call: tells a Ray restart (same fit) from a rerun of the stage
    live_ref: Any = None  # ray.ObjectRef of a live_eval.LiveEval (rank 0 runs it), or None
    spill_path: str | None = None  # where rank 0 keeps metrics the MLflow server never took


def fit(
    cfg: Config,
    shipped: WorkerData,
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    live=None,
    callbacks: list | None = None,
    spill_path: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Train under Ray Train on `shipped` (a runtime.WorkerData: the training split, its labels,
    CycleGAN's domain B, the held-out reals the stability monitor measures D's overfitting on);
    returns (final GAN state, Ray result path).

    A run with the same storage root and name continues from its last checkpoint. `live` (a
    live_eval.LiveEval) is run by rank 0 every `eval.every` steps when given. Per-step metrics
    the MLflow server did not take by the end (see tracking.MetricBuffer) go to `spill_path`, a path
    on rank 0's machine.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    storage_path, fs = storage_filesystem(cfg.storage.root, cfg.storage.s3_endpoint_url)
    t = cfg.train
    live_ref = None if live is None or not cfg.eval.every else ray.put(live)
    job = TrainJob(
        cfg=cfg.to_dict(),
        data_ref=ray.put(shipped),
        tracking_uri=tracking_uri,
        run_id=run_id,
        fit_id=uuid.uuid4().hex,
        live_ref=live_ref,
        spill_path=spill_path,
    )
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=resolve_use_gpu(cfg),
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise RuntimeError(_worker_error(e)) from None
    return runtime.load_state(result.checkpoint), result.path


def _worker_error(e: Exception) -> str:
    """The first failing worker's own error, without Ray's wrapping."""
    failures = getattr(e, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        err = failures[rank]
        return f"rank {rank}: {type(err).__name__}: {err}"
    cause = getattr(e, "controller_failure", None) or e
    return f"{type(cause).__name__}: {cause}"


# ---- inside a worker ------------------------------------------------------------------------


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray

    from pipeline.core import training
    from pipeline.io.tracking import MetricBuffer

    job: TrainJob = loop_config["job"]
    cfg = build_config(job.cfg)
    session = runtime.train_session()
    rank, world = session.rank, session.world
    worker = runtime.Worker(cfg, ray.get(job.data_ref), session)
    gan = worker.gan
    record = {k: worker.restored.get(k, v) for k, v in {"trained_s": 0.0, "finished_at": None}.items()}
    # a checkpoint written by this same fit() means Ray restarted the workers after a failure
    restarts = worker.restored.get("restarts", 0) + (worker.restored.get("fit_id") == job.fit_id)
    if rank == 0 and worker.restored and worker.finished:
        print(f"[train] this run already finished (step {gan.step}): handing it back", flush=True)
    elif rank == 0 and worker.restored:
        print(f"[train] resuming from checkpoint at step {gan.step} (restarts so far: {restarts})", flush=True)

    metrics = None
    if rank == 0:
        check_tracking_here(job.tracking_uri, "rank 0 of the training")
        metrics = MetricBuffer(job.tracking_uri, job.run_id, job.spill_path, cfg.tracking.flush_timeout_s)
    progress = _Progress(cfg.train.steps, gan.step)
    comm = Collectives(world, session.device)
    pids = comm.gather(os.getpid())
    if rank == 0:
        print(
            f"[train] {world} worker(s) on {session.device} (pids {' '.join(map(str, pids))}), "
            f"torch threads per worker {torch.get_num_threads()}, cluster {ray.get_runtime_context().gcs_address}"
            + (f", deterministic {cfg.train.deterministic}" if worker.numerics["flags_set"] else ""),
            flush=True,
        )
        if restarts:
            metrics.add(gan.step, {"sys/restarts": restarts})

    def on_log(step: int, stats: dict[str, float]) -> None:
        if metrics is not None:
            metrics.add(step, stats)
            metrics.flush()
            progress.show(step, stats)

    live = ray.get(job.live_ref) if rank == 0 and job.live_ref is not None else None
    latest: dict[str, float] = {}  # the last in-training evaluation, sent with every report

    def on_eval(g: training.GAN) -> dict[str, float]:
        if live is None:
            return {}
        values = live(g.G_ema if g.G_ema is not None else g.G, cfg.model.z_dim)
        latest.update({f"val/{k}": v for k, v in values.items()})
        metrics.add(g.step, latest)
        metrics.flush()
        print(f"[train] eval at step {g.step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()), flush=True)
        return values

    t_fit = time.perf_counter()  # this fit's training time adds to the run's `trained_s`
    handed_back, resumed_from = worker.finished, gan.step

    def on_checkpoint(g: training.GAN, final: bool) -> None:
        if world > 1:  # every worker holds (and rank 0 saves) the same batch-norm running statistics
            for module in (g.G, g.D, g.G_ema):
                comm.average_buffers(module)
        report = {"step": g.step, **latest, "diagnosis": g.monitor.verdict, "severe": ",".join(g.monitor.severe)}
        # CycleGAN history pools are per worker: rank 0's checkpoint carries every rank's
        pools = comm.gather({k: p.state_dict() for k, p in g.pools.items()}) if g.pools and world > 1 else None
        if metrics is not None:
            metrics.flush(wait=final)
        extra = {"fit_id": job.fit_id, "restarts": restarts, "pools_by_rank": pools}
        extra.update({"handed_back": handed_back, "resumed_from": resumed_from})
        if not handed_back:  # a hand-back keeps the record of the fit that trained
            extra["trained_s"] = record["trained_s"] + time.perf_counter() - t_fit
            extra["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if final else None
        else:
            extra.update(record)
        worker.report(report, extra, save=rank == 0)

    def on_event(g: training.GAN, event: dict[str, Any]) -> None:
        if rank == 0:
            print(f"[train] monitor: {monitor.describe(event)}", flush=True)

    hooks = training.Hooks(on_log=on_log, on_checkpoint=on_checkpoint, on_eval=on_eval, on_event=on_event)
    if world > 1:
        hooks.sync_grads, hooks.reduce_stats = comm.sync_grads, comm.reduce_stats
    worker.run(hooks)  # a finished run hands its final state back again


class _Progress:
    """A periodic progress line (rank 0): step, losses, speed, ETA."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.perf_counter()

    def show(self, step: int, stats: dict[str, float]) -> None:
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        keys = ("loss/D", "loss/G", "D/real", "D/fake")
        vals = " ".join(f"{k}={stats[k]:.3f}" for k in keys if k in stats)
        print(
            f"[train] step {step}/{self.total} ({100 * step / self.total:.0f}%) {vals} {rate:.0f} steps/s eta {eta:.0f}s",
            flush=True,
        )
