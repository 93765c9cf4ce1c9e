"""Ray Train data parallelism: N workers with batch B each == 1 worker with batch N*B (gloo on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import data
from pipeline.core.config import build_config, deep_merge, read_yaml
from pipeline.io import tracking
from pipeline.ray import distributed
from pipeline.ray.runtime import WorkerData
from tests.integration.conftest import ROOT, TINY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    distributed.ensure_ray(None, 2)
    yield
    ray.shutdown()


def fit(tmp_path: Path, name: str, x=None, **overrides) -> dict:
    raw = deep_merge(read_yaml(ROOT / "params.yaml"), TINY)
    raw = deep_merge(raw, {"storage": {"root": str(tmp_path / "ray")}, "train": {"ema": 0.0}})
    for key, value in overrides.items():
        raw = deep_merge(raw, {key: value})
    cfg = build_config(raw)
    x_train = data.prepare(cfg.data, cfg.seed).x_train if x is None else x
    uri = tracking.resolve_uri(None, env={}, cwd=tmp_path)
    run_id, _ = tracking.start_or_resume_run(uri, "dist-test", name, name)
    state, _ = distributed.fit(cfg, WorkerData.ship(x_train), tracking_uri=uri, run_id=run_id, name=name)
    return state


def assert_close(a: dict, b: dict, atol: float) -> None:
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k] - b[k]).abs().max())


ADA = {"enabled": True, "target": 0.01, "interval": 4, "speed_img": 2000}


@pytest.mark.parametrize(
    "loss,ada",
    [("nonsaturating", False), ("wgan-gp", False), ("nonsaturating", True)],
    ids=["nonsaturating", "wgan-gp", "ada"],
)
def test_two_workers_match_one_worker_with_twice_the_batch(ray_local, tmp_path, loss, ada):
    common = {"loss": {"name": loss}}
    train = {
        "steps": 60,
        "checkpoint_every": 30,
        "log_every": 30,
        "batch_size": 64,
        "ada": ADA if ada else {"enabled": False},
    }
    one = fit(tmp_path, f"one-{loss}-{ada}", **common, train={**train, "num_workers": 1})
    two = fit(tmp_path, f"two-{loss}-{ada}", **common, train={**train, "num_workers": 2})
    if ada:
        assert one["ada_p"] == two["ada_p"] > 0  # every worker moved p from the same reduced r_t
    assert one["step"] == two["step"] == 60
    assert_close(one["G"], two["G"], atol=1e-4)
    assert_close(one["D"], two["D"], atol=1e-4)
    # logged metrics are averaged over workers: the same numbers as one worker's
    for h1, h2 in zip(one["history"], two["history"]):
        assert h1["loss/D"] == pytest.approx(h2["loss/D"], abs=1e-4)


def test_two_worker_run_stopped_at_a_checkpoint_resumes_to_the_same_weights(ray_local, tmp_path):
    """A 2-worker run that stops after its checkpoint at step 30 and is continued to step 60 (same
    storage root and name: Ray Train restores the checkpoint) ends where an uninterrupted run does:
    weights, ADA's p and the data order all come back from the checkpoint. A finished run is not retrained."""
    train = {"num_workers": 2, "checkpoint_every": 30, "log_every": 30, "batch_size": 64, "ada": ADA}
    full = fit(tmp_path, "full", train={**train, "steps": 60})
    first = fit(tmp_path, "part", train={**train, "steps": 30})
    assert first["step"] == 30
    resumed = fit(tmp_path, "part", train={**train, "steps": 60})
    assert resumed["step"] == 60 and resumed["ada_p"] == full["ada_p"]
    # it continued: its step-30 row (with the measured step time) is the first run's, not a re-run's
    assert resumed["history"][0] == first["history"][0] and len(resumed["history"]) == 2
    assert_close(full["G"], resumed["G"], atol=1e-6)
    assert_close(full["D"], resumed["D"], atol=1e-6)
    assert [h["loss/D"] for h in resumed["history"]] == pytest.approx([h["loss/D"] for h in full["history"]], abs=1e-6)
    again = fit(tmp_path, "part", train={**train, "steps": 60})  # finished: handed back, not retrained
    assert again["history"] == resumed["history"] and all(
        torch.equal(again["G"][k], resumed["G"][k]) for k in again["G"]
    )
    # and says so, keeping the record of the fit that trained it
    assert again["handed_back"] and not resumed["handed_back"]
    assert again["finished_at"] == resumed["finished_at"] and again["trained_s"] == resumed["trained_s"] > 0


def test_the_memory_mapped_image_store_trains_as_the_same_images_in_memory(ray_local, tmp_path):
    """Two workers map the uint8 store by path (data.StoreFile: nothing goes through Ray's object
    store) and convert their rows; the weights equal two workers given the float images. (Image
    models keep batch norm, which normalises per worker on CPU, so 2 == 1 workers holds for the
    MLP runs above, not here.) DiffAugment's draws are sharded like every other draw."""
    common = {
        "data": {"name": "shapes", "n_samples": 300, "resolution": 16},
        "model": {"arch": "dcgan", "z_dim": 16, "hidden": 8},
        "eval": {"every": 0},
        "train": {
            "steps": 20,
            "checkpoint_every": 10,
            "log_every": 10,
            "batch_size": 32,
            "augment": "diffaugment",
            "num_workers": 2,
        },
    }
    cfg = build_config(deep_merge(read_yaml(ROOT / "params.yaml"), common))
    store = tmp_path / "store"
    store.mkdir()
    data.save_prepared(data.prepare(cfg.data, cfg.seed, scratch=store), store)
    x = data.load_prepared(store).x_train
    assert isinstance(x, np.memmap) and x.dtype == np.uint8
    mapped = fit(tmp_path, "store-mapped", x=x, **common)
    floats = fit(tmp_path, "store-floats", x=data.to_unit(np.asarray(x)), **common)
    assert mapped["step"] == floats["step"] == 20
    assert_close(mapped["G"], floats["G"], atol=0)
    assert_close(mapped["D"], floats["D"], atol=0)


def _row_first_drawn_after(x: torch.Tensor, batch_size: int, seed: int, after: int) -> tuple[int, int]:
    """A row of `x` that no real batch (phase 0) draws before step `after`, and the step that first does."""
    from pipeline.core import training

    b = training.Batches(x, batch_size, 2, seed)
    drawn: set[int] = set()
    for step in range(after):
        b.begin(step)
        drawn.update(b.reals_index(step, 0).tolist())
    for step in range(after, after + 200):
        b.begin(step)
        fresh = [i for i in b.reals_index(step, 0).tolist() if i not in drawn]
        if fresh:
            return fresh[0], step
    raise AssertionError("no row is first drawn within 200 steps")


def test_two_workers_roll_back_together_and_stop_like_one(ray_local, tmp_path):
    """A row that overflows D's scores, first drawn after two healthy monitor ticks: the loss turns NaN
    on one worker's shard only, the monitor's reduced signals show it to both, both roll back to the same
    healthy state (no worker left waiting in a collective), replay into the same row, and stop after
    train.max_rollbacks with the message one worker gives."""
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    row, step = _row_first_drawn_after(x, 64, seed=0, after=110)
    x[row] = 3e38
    train = {"steps": 400, "batch_size": 64, "log_every": 50, "checkpoint_every": 50, "max_rollbacks": 1}
    messages = []
    for workers in (1, 2):
        with pytest.raises(RuntimeError) as info:
            fit(tmp_path, f"rollback-{workers}", x=x.numpy(), train={**train, "num_workers": workers})
        messages.append(str(info.value).split("NonFiniteLoss: ", 1)[-1])
    tick = -(-(step + 1) // 50) * 50  # the first monitor tick at or after the bad step
    assert messages[0] == messages[1]
    assert (
        messages[0].startswith(f"step {tick}: loss/") and "after 1 rollback(s) (train.max_rollbacks 1)" in messages[0]
    )
