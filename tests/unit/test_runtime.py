"""The one worker runtime (pipeline.ray.runtime) without Ray: a Session is only where reports go, so a
local one shows the checkpoint format, the restore and the hand-back that Ray Train workers and Tune
trials share."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import data, training
from pipeline.core.config import build_config, deep_merge, read_yaml
from pipeline.ray import runtime

ROOT = Path(__file__).resolve().parents[2]


class _Checkpoint:
    """What a Ray checkpoint offers the runtime: a folder."""

    def __init__(self, folder: str):
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self):
        yield self.folder


def _session(reports: list, keep: Path, checkpoint=None) -> runtime.Session:
    def report(metrics, folder):
        saved = None
        if folder is not None:  # the folder is temporary: keep a copy, as Ray does
            saved = str(keep / f"ckpt-{len(reports)}")
            shutil.copytree(folder, saved)
        reports.append((metrics, saved))

    return runtime.Session(device=torch.device("cpu"), checkpoint=checkpoint, report=report)


def _cfg(steps: int, **train):
    raw = deep_merge(read_yaml(ROOT / "params.yaml"), {"data": {"n_samples": 2000}, "model": {"hidden": 16}})
    train = {"steps": steps, "batch_size": 32, "checkpoint_every": 10, "monitor_every": 5, **train}
    return build_config(deep_merge(raw, {"train": train}))


class _Stop(Exception):
    """The worker's process ends here (a preemption)."""


def _train(cfg, shipped, reports, keep, checkpoint=None, stop_at=None) -> runtime.Worker:
    worker = runtime.Worker(cfg, shipped, _session(reports, keep, checkpoint))

    def on_checkpoint(g, final):
        worker.report({"step": g.step}, {"note": "mine"})
        if g.step == stop_at:
            raise _Stop

    with contextlib.suppress(_Stop):
        worker.run(training.Hooks(on_checkpoint=on_checkpoint))
    return worker


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_a_restored_worker_continues_bit_for_bit_and_a_finished_one_hands_its_state_back(decay):
    """Also under train.lr_decay: the schedule is a function of the step, so a resumed run follows it."""
    cfg = _cfg(20, lr_decay=decay)
    prepared = data.prepare(cfg.data, cfg.seed)
    shipped = runtime.WorkerData.ship(prepared.x_train, y=prepared.y_train, heldout=prepared.x_val)
    with tempfile.TemporaryDirectory() as keep:
        keep = Path(keep)
        straight: list = []
        whole = _train(cfg, shipped, straight, keep / "a")
        assert [m["step"] for m, _ in straight] == [10, 20] and whole.batches.heldout is not None

        first: list = []
        _train(cfg, shipped, first, keep / "b", stop_at=10)
        resumed: list = []
        again = _train(cfg, shipped, resumed, keep / "c", _Checkpoint(first[-1][1]))
        assert again.restored["step"] == 10 and again.restored["note"] == "mine"  # what the writer added
        assert [m["step"] for m, _ in resumed] == [20]
        for a, b in zip(whole.gan.G.state_dict().values(), again.gan.G.state_dict().values()):
            assert torch.equal(a, b)
        # the last step (19) ran at 1 - decay * 19 / 20 of the base rates, in both runs
        for w in (whole, again):
            assert w.gan.opt_g.param_groups[0]["lr"] == pytest.approx(cfg.train.lr_g * (1 - decay * 19 / 20))

        handed: list = []
        done = _train(cfg, shipped, handed, keep / "d", _Checkpoint(resumed[-1][1]))
        assert done.finished and [m["step"] for m, _ in handed] == [20]  # nothing trained, reported again
        saved = runtime.load_state(_Checkpoint(handed[-1][1]))
        for a, b in zip(whole.gan.G.state_dict().values(), saved["G"].values()):
            assert torch.equal(a, b)


def test_the_worker_takes_labels_only_for_conditional_models():
    x = np.random.default_rng(0).uniform(-1, 1, size=(64, 1, 8, 8)).astype(np.float32)
    y = np.arange(64) % 4
    shipped = runtime.WorkerData(x=x, y=y, num_classes=4, heldout=x[:8], heldout_y=y[:8])
    images = deep_merge(_cfg(1).to_dict(), {"data": {"name": "digits"}, "model": {"arch": "dcgan", "z_dim": 16}})
    conditional = build_config(deep_merge(images, {"model": {"conditional": True}}))
    with tempfile.TemporaryDirectory() as keep:
        plain = runtime.Worker(build_config(images), shipped, _session([], Path(keep)))
        labelled = runtime.Worker(conditional, shipped, _session([], Path(keep)))
    assert plain.batches.num_classes == 0 and plain.batches.heldout_y is None and plain.batches.heldout is not None
    assert labelled.batches.num_classes == 4 and torch.equal(labelled.batches.heldout_y, torch.tensor(y[:8]))
    assert (
        runtime.as_tensor(x).data_ptr() != torch.from_numpy(x).data_ptr()
    )  # a copy: object-store arrays are read-only
