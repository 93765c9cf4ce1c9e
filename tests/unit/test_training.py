"""pipeline.core.training, the bare loop (no Ray): determinism, exact resume, sharding, NaN/inf stops."""

from __future__ import annotations

import copy
import re
import threading

import numpy as np
import pytest
import torch

from pipeline.core.config import build_config, deep_merge
from pipeline.core.data import prepare
from pipeline.core.training import (
    Batches,
    Hooks,
    NonFiniteLoss,
    Shard,
    build_gan,
    gan_state,
    load_gan_state,
    sample,
    train,
)

BASE = {
    "seed": 0,
    "data": {"name": "grid", "n_samples": 2000},
    "model": {"arch": "mlp", "z_dim": 2, "hidden": 16},
    "train": {"steps": 30, "log_every": 10, "checkpoint_every": 10, "batch_size": 32, "ema": 0.0},
}


def tiny(**update):
    return build_config(deep_merge(BASE, update))


@pytest.fixture(scope="module")
def data():
    cfg = tiny()
    return prepare(cfg.data, cfg.seed)


def _batches(cfg, p, shard=None, x=None):
    x = torch.from_numpy(p.x_train) if x is None else x
    kw = {} if shard is None else {"shard": shard}
    return Batches(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, **kw)


def _run(cfg, p, hooks=None):
    gan = build_gan(cfg, list(p.x_train.shape[1:]))
    return train(gan, cfg, _batches(cfg, p), hooks or Hooks())


def _params(module):
    return [t.detach().clone() for t in module.state_dict().values()]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _losses(history):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


# ---- (a) same seed, same result --------------------------------------------------------------


def test_same_seed_bit_identical(data):
    cfg = tiny()
    init = _params(build_gan(cfg, [2]).G)
    a, b = _run(cfg, data), _run(cfg, data)
    assert a.step == b.step == 30
    assert _equal(_params(a.G), _params(b.G))
    assert _equal(_params(a.D), _params(b.D))
    assert _losses(a.history) == _losses(b.history)
    assert [row["step"] for row in a.history] == [10, 20, 30]
    assert not _equal(_params(a.G), init)  # training moved the weights


def test_other_seed_differs(data):
    a, b = _run(tiny(), data), _run(tiny(seed=1), data)
    assert not _equal(_params(a.G), _params(b.G))


# ---- (b) resume exactness --------------------------------------------------------------------

RESUME_CASES = {
    "nonsaturating": {},
    "wgan-gp-ncritic2-ema": {"loss": {"name": "wgan-gp"}, "train": {"n_critic": 2, "ema": 0.9}},
    "batchnorm-r1": {"model": {"d_norm": "batch"}, "loss": {"r1_gamma": 1.0}},
    "wgan-clip": {"loss": {"name": "wgan"}},
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_exact(data, case):
    cfg = tiny(**RESUME_CASES[case])
    saved, calls = {}, []

    def on_checkpoint(gan, final):
        calls.append((gan.step, final))
        saved[gan.step] = copy.deepcopy(gan_state(gan))

    full = _run(cfg, data, Hooks(on_checkpoint=on_checkpoint))
    assert calls == [(10, False), (20, False), (30, True)]

    fresh = build_gan(cfg, [2])
    load_gan_state(fresh, saved[10], cfg)
    assert fresh.step == 10 and len(fresh.history) == 1
    resumed = train(fresh, cfg, _batches(cfg, data))

    assert resumed.step == 30
    assert _equal(_params(resumed.G), _params(full.G))
    assert _equal(_params(resumed.D), _params(full.D))
    if cfg.train.ema > 0:
        assert _equal(_params(resumed.G_ema), _params(full.G_ema))
    assert _losses(resumed.history) == _losses(full.history)


def test_resume_state_is_a_snapshot(data):
    # the state captured at step 10 differs from the final weights: the comparison above is not vacuous
    cfg = tiny()
    saved = {}
    full = _run(
        cfg, data, Hooks(on_checkpoint=lambda gan, final: saved.setdefault(gan.step, copy.deepcopy(gan_state(gan))))
    )
    assert not _equal(list(saved[10]["G"].values()), _params(full.G))
    # and restarting from step 10 without the optimizer state would not reproduce the run
    fresh = build_gan(cfg, [2])
    fresh.G.load_state_dict(saved[10]["G"])
    fresh.D.load_state_dict(saved[10]["D"])
    fresh.step = 10
    train(fresh, cfg, _batches(cfg, data))
    assert not _equal(_params(fresh.G), _params(full.G))


def test_load_state_takes_current_hyperparameters(data):
    cfg = tiny()
    saved = {}
    _run(cfg, data, Hooks(on_checkpoint=lambda gan, final: saved.setdefault(gan.step, copy.deepcopy(gan_state(gan)))))
    other = tiny(train={"lr_g": 0.005, "lr_d": 0.0001, "betas": [0.0, 0.9]})
    gan = build_gan(other, [2])
    load_gan_state(gan, saved[10], other)
    assert gan.opt_g.param_groups[0]["lr"] == 0.005 and gan.opt_d.param_groups[0]["lr"] == 0.0001
    assert tuple(gan.opt_g.param_groups[0]["betas"]) == (0.0, 0.9)


# ---- (c) sharding ----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_shards_draw_the_global_batch(data, world):
    cfg = tiny()
    one = _batches(cfg, data)
    parts = [_batches(cfg, data, Shard(r, world)) for r in range(world)]
    for step in (0, 7, 29):
        for phase in (0, 1, 2, 63):
            reals = torch.cat([b.reals(step, phase) for b in parts])
            lat = torch.cat([b.latents(step, phase) for b in parts])
            uni = torch.cat([b.uniform(step, phase) for b in parts])
            assert reals.shape == (32, 2) and lat.shape == (32, 2) and uni.shape == (32,)
            assert torch.equal(reals, one.reals(step, phase))
            assert torch.equal(lat, one.latents(step, phase))
            assert torch.equal(uni, one.uniform(step, phase))
        # the halves are different samples, not copies
        assert not torch.equal(parts[0].latents(step, 1), parts[1].latents(step, 1))


def test_draws_are_keyed_by_step_and_phase(data):
    b = _batches(tiny(), data)
    assert torch.equal(b.latents(3, 1), b.latents(3, 1))
    assert not torch.equal(b.latents(3, 1), b.latents(4, 1))
    assert not torch.equal(b.latents(3, 1), b.latents(3, 63))
    assert not torch.equal(b.reals(3, 0), b.reals(4, 0))


class _ThreadAllReduce:
    """Gradient averaging between threads standing in for workers (what the Ray hook does over gloo)."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world

    def hook(self, rank):
        def sync(module):
            params = [p for p in module.parameters() if p.grad is not None]
            self.slots[rank] = [p.grad.clone() for p in params]
            self.barrier.wait()
            avg = [sum(s[i] for s in self.slots) / self.world for i in range(len(params))]
            self.barrier.wait()
            for p, g in zip(params, avg, strict=True):
                p.grad.copy_(g)

        return sync


@pytest.mark.parametrize("loss", ["nonsaturating", "wgan-gp"])
def test_two_workers_match_one_worker(data, loss):
    cfg = tiny(loss={"name": loss}, train={"steps": 20})
    single = _run(cfg, data)

    world = 2
    reduce = _ThreadAllReduce(world)
    gans = [build_gan(cfg, [2]) for _ in range(world)]
    errors = []

    def work(rank):
        try:
            train(gans[rank], cfg, _batches(cfg, data, Shard(rank, world)), Hooks(sync_grads=reduce.hook(rank)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            reduce.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g in gans:
        for a, b in zip(_params(g.G), _params(single.G), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert _equal(_params(gans[0].G), _params(gans[1].G))  # replicas stay identical


# ---- (d) non-finite losses stop the run ------------------------------------------------------


def test_inf_data_raises_non_finite_loss(data):
    cfg = tiny()
    x = torch.full((100, 2), float("inf"))
    gan = build_gan(cfg, [2])
    checkpoints = []
    with pytest.raises(NonFiniteLoss) as info:
        train(gan, cfg, _batches(cfg, data, x=x), Hooks(on_checkpoint=lambda g, final: checkpoints.append(g.step)))
    msg = str(info.value)
    assert re.match(r"^step 10: loss/(D|G) is (nan|inf|-inf)\b", msg), msg
    assert checkpoints == []  # the bad state never reached a checkpoint


def test_non_finite_caught_at_checkpoint_before_log_tick(data):
    cfg = tiny(train={"log_every": 10, "checkpoint_every": 5})
    x = torch.from_numpy(data.x_train).clone()
    x[:] = float("nan")
    gan = build_gan(cfg, [2])
    checkpoints = []
    with pytest.raises(NonFiniteLoss, match=r"^step 5: loss/"):
        train(gan, cfg, _batches(cfg, data, x=x), Hooks(on_checkpoint=lambda g, final: checkpoints.append(g.step)))
    assert checkpoints == []


def test_finite_run_does_not_raise(data):
    gan = _run(tiny(), data)
    assert all(np.isfinite(v) for row in gan.history for v in row.values())


# ---- sampling --------------------------------------------------------------------------------


def test_sample_deterministic_and_restores_mode(data):
    gan = _run(tiny(train={"steps": 10}), data)
    gan.G.train()
    a = sample(gan.G, 50, 2, seed=3, batch=16)
    b = sample(gan.G, 50, 2, seed=3)
    c = sample(gan.G, 50, 2, seed=4)
    assert a.shape == (50, 2) and a.dtype == np.float32
    # the same call draws the same samples; another batching only reorders float sums (BLAS kernels
    # differ by batch size), another seed draws others
    assert np.array_equal(b, sample(gan.G, 50, 2, seed=3)) and np.allclose(a, b, rtol=0, atol=1e-6)
    assert not np.allclose(a, c, atol=1e-3)
    assert gan.G.training


def test_ada_p_rises_while_d_overfits_and_is_kept_in_checkpoints():
    from pipeline.core import training

    cfg = build_config(
        {
            "data": {"name": "grid", "n_samples": 2000},
            "model": {"hidden": 16},
            "train": {
                "steps": 40,
                "batch_size": 32,
                "log_every": 10,
                "checkpoint_every": 20,
                "ada": {"enabled": True, "target": 0.01, "interval": 4, "speed_img": 2000},
            },
        }
    )
    p = prepare(cfg.data, cfg.seed)
    gan = training.build_gan(cfg, [2])
    logged, saved = [], []
    hooks = training.Hooks(
        on_log=lambda s, st: logged.append(st), on_checkpoint=lambda g, final: saved.append(training.gan_state(g))
    )
    training.train(gan, cfg, training.Batches(torch.from_numpy(p.x_train), 32, 2, cfg.seed), hooks)
    # D separates reals quickly (r_t > 0.01 target): p climbs by 32 * 4 / 2000 per adjustment
    assert gan.ada_p > 0 and logged[-1]["ada/p"] > logged[0]["ada/p"]
    assert saved[-1]["ada_p"] == gan.ada_p
    assert all(0 <= s["ada/p"] <= cfg.train.ada.p_max for s in logged)


@pytest.mark.parametrize("r1", [0.0, 1.0])
def test_packs_are_all_real_or_all_fake(data, r1):
    """PacGAN: every batch D scores during training is wholly real or wholly generated, so no pack
    mixes the two (a pack is a run of `pack` consecutive rows of one call)."""
    cfg = tiny(model={"pack": 4}, loss={"r1_gamma": r1}, train={"steps": 3})
    gan = build_gan(cfg, [2])
    real_rows = {tuple(r) for r in torch.from_numpy(data.x_train).tolist()}
    kinds = []
    gan.D.register_forward_pre_hook(
        lambda _m, args: kinds.append({tuple(r) in real_rows for r in args[0].detach().tolist()})
    )
    train(gan, cfg, _batches(cfg, data))
    assert kinds and all(len(k) == 1 for k in kinds)  # no call holds both real and generated rows
    assert {True} in kinds and {False} in kinds
