"""One worker runtime for Ray Train workers and Tune trials.

A worker (one of a Ray Train run's N, or a single-worker Tune trial) receives the same `WorkerData`,
reports through a `Session` (Ray Train's or Tune's: the only difference between them), and runs a
`Worker`: it places the data, builds the GAN, restores it from the session's checkpoint, draws its
slice of every global batch, and writes every checkpoint in one format (`STATE_FILE`: the GAN state
plus whatever the caller adds). `pipeline.ray.distributed` and `pipeline.ray.tune` add only what is theirs:
collectives, progress and live evaluation for a run; the trial's metrics and diagnosis for Tune.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import data, training
from pipeline.core.config import Config
from pipeline.core.objectives import objective
from pipeline.io import store_shipping
from pipeline.io.outputs import UnreadableFile, UnsafeFile, load_tensors

STATE_FILE = "state.pt"


@dataclass(frozen=True, kw_only=True)
class WorkerData:
    """The arrays a worker trains on (plain data: they cross process boundaries, through Ray's object
    store). A memory-mapped image store travels as a data.StoreFile (its path), and each worker maps
    it itself. The worker, not the driver, decides what its config uses: labels only when the model is
    conditional, no held-out reals and no labels for CycleGAN."""

    x: Any  # the training split (np.ndarray or data.StoreFile)
    y: np.ndarray | None = None  # its labels
    num_classes: int | None = None
    x_b: np.ndarray | None = None  # CycleGAN: domain B images, unpaired with x
    heldout: Any = None  # reals never trained on (the validation split): the monitor's measure of D's overfitting
    heldout_y: np.ndarray | None = None

    @classmethod
    def ship(cls, x, **kw) -> WorkerData:
        """From the driver's arrays: memory-mapped ones by path (data.shippable)."""
        return cls(x=data.shippable(x), **{**kw, "heldout": data.shippable(kw.get("heldout"))})


def as_tensor(shipped) -> torch.Tensor | None:
    """A shipped array as a tensor: a memory-mapped store is mapped (no copy; fetched first on a node
    without it, when it was shipped through storage.root), anything else copied (arrays from Ray's
    object store are read-only)."""
    if shipped is None:
        return None
    a = store_shipping.open_store(shipped) if isinstance(shipped, data.StoreFile) else shipped
    return torch.from_numpy(a) if isinstance(a, np.memmap) else torch.tensor(a)


@dataclass(frozen=True, kw_only=True)
class Session:
    """Where a worker reports: a Ray Train run (rank of world) or a Tune trial (rank 0 of 1)."""

    device: torch.device
    checkpoint: Any  # the Ray checkpoint to restore from, or None
    report: Callable[[dict[str, Any], str | None], None]  # metrics, and a checkpoint folder or None
    rank: int = 0
    world: int = 1


def train_session() -> Session:
    """Inside a Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=None if folder is None else ray.train.Checkpoint.from_directory(folder))

    return Session(
        device=ray.train.torch.get_device(),
        checkpoint=ray.train.get_checkpoint(),
        report=report,
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
    )


def tune_session() -> Session:
    """Inside a single-worker Tune trial: the GPU Ray gave it (its resources asked for one), else the CPU."""
    import ray
    from ray import tune

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        tune.report(metrics, checkpoint=None if folder is None else tune.Checkpoint.from_directory(folder))

    device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
    return Session(device=device, checkpoint=tune.get_checkpoint(), report=report)


class _OneLineFailures(logging.Filter):
    """Ray Train logs the traceback of whatever a worker raises ("Error in training function:" and
    a dozen lines, in the user's terminal); failures whose message already names their cause and
    place (a NaN loss and its step, an unreadable or unsafe checkpoint) need none: the stage prints
    that message as its one error line. Every other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = sys.exc_info()[1]  # Ray formats the traceback inside the handler of the user's exception
        return not (str(record.msg).startswith("Error in training function") and isinstance(exc, ONE_LINE_FAILURES))


ONE_LINE_FAILURES = (training.Diverged, UnsafeFile, UnreadableFile)
_RAY_TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"  # where Ray Train 2.x logs a worker's exception


class Worker:
    """Build, restore, batch and checkpoint a GAN for one worker of a session."""

    def __init__(self, cfg: Config, shipped: WorkerData, session: Session):
        self.cfg, self.session = cfg, session
        logger = logging.getLogger(_RAY_TRAIN_ERROR_LOGGER)
        if not any(isinstance(f, _OneLineFailures) for f in logger.filters):  # a reused process: once
            logger.addFilter(_OneLineFailures())
        device = session.device
        torch.set_num_threads(cfg.train.cpus_per_worker)
        if device.type == "cuda":  # NCCL's object collectives (the pids, CycleGAN pools) use the current device
            torch.cuda.set_device(device)
        self.numerics = training.configure_numerics(cfg.train.deterministic, device)
        labelled = objective(cfg.model.family).labels
        num_classes = shipped.num_classes if cfg.model.conditional else None
        # on the GPU when they fit there (training.place_data), else in host memory
        x, y, x_b, heldout, heldout_y = (
            training.place_data(as_tensor(a), device)
            for a in (
                shipped.x,
                shipped.y if labelled else None,  # CycleGAN never sees labels
                shipped.x_b,
                shipped.heldout if labelled else None,
                shipped.heldout_y if num_classes else None,
            )
        )
        self.gan = training.build_gan(cfg, list(x.shape[1:]), device, num_classes)
        if session.world > 1 and device.type == "cuda":  # batch statistics over the global batch (NCCL)
            self.gan.G = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.gan.G)  # keeps the parameter objects
            self.gan.D = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.gan.D)
        self.restored: dict[str, Any] = {}  # the checkpoint's whole state (with what its writer added)
        if session.checkpoint is not None:
            state = load_state(session.checkpoint, device)
            if len(state.get("pools_by_rank") or []) == session.world:  # CycleGAN: each worker its own pool
                state["pools"] = state["pools_by_rank"][session.rank]
            training.load_gan_state(self.gan, state, cfg)
            self.restored = state
        self.batches = training.Batches(
            x,
            cfg.train.batch_size,
            cfg.model.z_dim,
            cfg.seed,
            training.Shard(session.rank, session.world),
            y,
            num_classes or 0,
            x_b,
            device,
            channels_last=cfg.train.channels_last and x.dim() == 4,
            heldout=heldout,
            heldout_y=heldout_y,
        )

    @property
    def finished(self) -> bool:
        """Restored at (or past) the last step: nothing is left to train."""
        return self.gan.step >= self.cfg.train.steps

    def run(self, hooks: training.Hooks) -> None:
        """Train to train.steps; a finished run trains nothing and reports its final state again
        (`hooks.on_checkpoint(gan, final=True)`), so the caller's record still ends on it."""
        if self.finished:
            hooks.on_checkpoint(self.gan, True)
            return
        training.train(self.gan, self.cfg, self.batches, hooks)

    def report(self, metrics: dict[str, Any], extra: dict[str, Any] | None = None, save: bool = True) -> None:
        """Report `metrics` to the session, with a checkpoint (the GAN state and `extra`) when `save`."""
        if not save:
            self.session.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({**training.gan_state(self.gan), **(extra or {})}, Path(d) / STATE_FILE)
            self.session.report(metrics, d)


def load_state(checkpoint, map_location=None) -> dict[str, Any]:
    """The state a Worker saved into a Ray checkpoint (the driver's side of `Worker.report`)."""
    with checkpoint.as_directory() as d:
        try:
            return load_tensors(Path(d) / STATE_FILE, map_location=map_location)
        except ValueError as e:
            if str(checkpoint.path) in str(e):  # a local checkpoint: the message names it already
                raise
            # d is a temporary copy of a checkpoint in a bucket: name it where it lives
            raise type(e)(f"the checkpoint {checkpoint.path}: {e}") from None
