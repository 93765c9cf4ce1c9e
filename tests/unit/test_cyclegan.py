"""CycleGAN (model.family: cyclegan): nets, losses, history pool, the hidden-information diagnostic,
config validation, export of both generators, and an exact resume including the pool."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.core import cyclegan, data, draws, training
from pipeline.core.config import ConfigError, build_config
from pipeline.core.losses import LOSSES
from pipeline.io.export import PARITY_TOL, export_translators

SHAPE = [1, 28, 28]


def cfg(**sections):
    raw = {
        "seed": 0,
        "data": {"name": "digits", "target": "mnist5k"},
        "model": {"family": "cyclegan", "arch": "dcgan", "hidden": 4, "layers": 1, "d_norm": "instance"},
        "loss": {"name": "lsgan", "identity_weight": 1.0},
        "train": {"steps": 4, "batch_size": 4, "pool_size": 3, "checkpoint_every": 2, "log_every": 2},
    }
    for key, update in sections.items():
        raw[key] = {**raw.get(key, {}), **update}
    return build_config(raw)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def batches(c, n: int = 16) -> training.Batches:
    return training.Batches(images(n, 1), c.train.batch_size, 1, c.seed, x_b=images(n, 2))


# ---- nets and losses ---------------------------------------------------------------------------


def test_both_directions_map_images_to_images_and_all_losses_are_finite():
    c = cfg()
    gan = training.build_gan(c, SHAPE)
    x, y = images(4, 1), images(4, 2)
    for net in (gan.G.xy, gan.G.yx):
        out = net(x)
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert gan.D.x(x).shape == (4,) and gan.D.y(y).shape == (4,)
    assert not torch.equal(gan.G.xy(x), gan.G.yx(x)), "G and F are two networks"
    total, stats, (fake_x, fake_y) = cyclegan.cycle_g_loss(gan, c, x, y)
    assert fake_x.shape == fake_y.shape == x.shape
    assert {"loss/G", "loss/G_adv", "loss/cycle", "loss/identity"} <= set(stats)
    expected = stats["loss/G_adv"] + 10.0 * stats["loss/cycle"] + 1.0 * stats["loss/identity"]
    assert torch.isclose(total, expected) and torch.isfinite(total)
    # the cycle term is the mean L1 of both reconstructions
    with torch.no_grad():
        cyc = (gan.G.yx(gan.G.xy(x)) - x).abs().mean() + (gan.G.xy(gan.G.yx(y)) - y).abs().mean()
    assert torch.isclose(stats["loss/cycle"], cyc)
    d_total, d_stats = cyclegan.cycle_d_loss(gan, c, batches(c), 0, 0, (x, y), (fake_x.detach(), fake_y.detach()))
    assert torch.isfinite(d_total) and 0 < float(d_stats["D/real"]) < 1


@pytest.mark.parametrize("loss", ["nonsaturating", "wgan-gp", "hinge"])
def test_one_training_step_moves_all_four_nets(loss):
    c = cfg(loss={"name": loss}, train={"steps": 1, "n_critic": 2 if loss == "wgan-gp" else 1})
    gan = training.build_gan(c, SHAPE)
    before = copy.deepcopy(gan)
    training.train(gan, c, batches(c))
    for new, old in ((gan.G.xy, before.G.xy), (gan.G.yx, before.G.yx), (gan.D.x, before.D.x), (gan.D.y, before.D.y)):
        assert any(not torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters()))
    assert {"loss/cycle", "loss/identity", "loss/D", "loss/G"} <= set(gan.history[-1])


def _g_grads(gan, c, x, y, only_adversarial: bool) -> list[torch.Tensor]:
    gan.opt_g.zero_grad(set_to_none=True)
    if only_adversarial:
        loss = LOSSES[c.loss.name]
        total = loss.g(gan.D.y(gan.G.xy(x))) + loss.g(gan.D.x(gan.G.yx(y)))
    else:
        total, _, _ = cyclegan.cycle_g_loss(gan, c, x, y)
    total.backward()
    return [p.grad.clone() for p in gan.G.parameters()]


def test_cycle_weight_zero_leaves_the_cycle_loss_out_of_the_gradients():
    x, y = images(4, 1), images(4, 2)
    c0 = cfg(loss={"cycle_weight": 0.0, "identity_weight": 0.0})
    gan = training.build_gan(c0, SHAPE)
    adversarial = _g_grads(gan, c0, x, y, only_adversarial=True)
    with_zero = _g_grads(gan, c0, x, y, only_adversarial=False)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(adversarial, with_zero))
    _, stats, _ = cyclegan.cycle_g_loss(gan, c0, x, y)
    assert float(stats["loss/cycle"]) > 0  # still measured and logged
    c10 = cfg(loss={"cycle_weight": 10.0, "identity_weight": 0.0})
    with_cycle = _g_grads(gan, c10, x, y, only_adversarial=False)
    assert max(float((a - b).abs().max()) for a, b in zip(adversarial, with_cycle)) > 1e-4


# ---- the history pool ----------------------------------------------------------------------------


def _run_pool(size: int, seed: int, queries: int, n: int = 10):
    """Feed images whose value is their serial number; returns (serials returned, serials given) per query."""
    pool, out, serial = cyclegan.ImagePool(size), [], 0
    for q in range(queries):
        given = torch.arange(serial, serial + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *SHAPE).clone()
        got = pool.query(given, draws.step_generator(seed, q, 2))
        out.append((got[:, 0, 0, 0].long(), given[:, 0, 0, 0].long()))
        serial += n
    return pool, out


def test_pool_returns_past_images_half_the_time_once_full():
    size, n = 50, 10
    pool, out = _run_pool(size, seed=0, queries=305, n=n)
    fill = size // n
    for got, given in out[:fill]:  # filling: the new images come straight back
        assert torch.equal(got, given)
    past = torch.cat([got != given for got, given in out[fill:]]).float()
    assert past.numel() == 3000 and abs(float(past.mean()) - 0.5) < 0.03  # binomial std 0.009
    for got, given in out[fill:]:  # a past image is an earlier one (image by image: maybe of this batch)
        assert (got <= given).all() and got.unique().numel() == len(got)
    assert len(pool) == size


def test_pool_is_deterministic_off_and_its_state_resumes_exactly():
    _, a = _run_pool(5, seed=3, queries=20)
    _, b = _run_pool(5, seed=3, queries=20)
    _, c = _run_pool(5, seed=4, queries=20)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))
    x = images(4, 0)
    assert cyclegan.ImagePool(0).query(x, torch.Generator().manual_seed(0)) is x
    pool, _ = _run_pool(5, seed=3, queries=10)
    copy_ = cyclegan.ImagePool(5)
    copy_.load_state_dict(pool.state_dict())
    g1, g2 = draws.step_generator(3, 10, 2), draws.step_generator(3, 10, 2)
    assert torch.equal(pool.query(x, g1), copy_.query(x, g2)) and torch.equal(pool.images, copy_.images)


# ---- the hidden-information diagnostic -------------------------------------------------------------


class _Hide(torch.nn.Module):
    """G(x) = constant image + 1e-3 * (x times a checkerboard): x hidden in faint high-frequency noise."""

    def __init__(self, amp: float = 1e-3):
        super().__init__()
        grid = torch.arange(28)
        self.register_buffer("checker", ((grid[:, None] + grid[None, :]) % 2 * 2 - 1).float())
        self.amp = amp

    def forward(self, x):
        return 0.2 + self.amp * self.checker * x


class _Reveal(_Hide):
    """F(y) decodes what _Hide encoded."""

    def forward(self, y):
        return self.checker * (y - 0.2) / self.amp


def test_noise_diagnostic_flags_a_pair_that_hides_its_input_and_passes_an_honest_one():
    x = images(64, 5).numpy()
    hiding = cyclegan.cycle_diagnostics(_Hide(), _Reveal(), x, seed=0)
    assert hiding["cycle_l1"] < 1e-4  # a perfect cycle ...
    assert hiding["hidden_information"] and hiding["noise_gain"] > 100  # ... that noise destroys
    assert hiding["cycle_l1_noisy"] > 1.0 and hiding["noise_ratio"] > 1000
    honest = cyclegan.cycle_diagnostics(torch.nn.Identity(), torch.nn.Identity(), x, seed=0)
    assert not honest["hidden_information"]
    assert honest["cycle_l1"] == 0 and abs(honest["noise_gain"] - 1.0) < 1e-3  # the noise, passed through 1:1
    assert abs(honest["cycle_l1_noisy"] - cyclegan.NOISE_STD * np.sqrt(2 / np.pi)) < 2e-3


# ---- config and data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"family": "cyclegan", "arch": "dcgan"}, "data": {"name": "digits"}}, "data.target:"),
        ({"data": {"name": "digits", "target": "mnist5k"}, "model": {"arch": "dcgan"}}, "data.target:"),
        ({"data": {"name": "digits", "target": "digits"}, "model": {"family": "cyclegan", "arch": "dcgan"}}, "data.target:"),
        ({"data": {"name": "digits", "target": "ring"}, "model": {"family": "cyclegan", "arch": "dcgan"}}, "data.target: must be one of"),
        ({"data": {"name": "grid", "target": "mnist5k"}, "model": {"family": "cyclegan"}}, "data.target:"),
        ({"model": {"family": "cycle"}}, "model.family: must be one of"),
        ({"loss": {"cycle_weight": -1}}, "loss.cycle_weight: must be >= 0"),
        ({"loss": {"identity_weight": -0.5}}, "loss.identity_weight: must be >= 0"),
        ({"train": {"pool_size": -1}}, "train.pool_size: must be >= 0"),
        ({"data": {"name": "digits", "target": "mnist5k"}, "model": {"family": "cyclegan", "arch": "dcgan", "conditional": True}}, "model.conditional:"),
        ({"data": {"name": "digits", "target": "mnist5k"}, "model": {"family": "cyclegan", "arch": "dcgan"}, "train": {"ada": {"enabled": True}}}, "train.augment: cyclegan does not support augmentation yet, got ada"),
        ({"data": {"name": "digits", "target": "mnist5k"}, "model": {"family": "cyclegan", "arch": "dcgan"}, "train": {"augment": "diffaugment"}}, "train.augment:"),
    ],
)  # fmt: skip
def test_bad_cyclegan_params_give_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    assert str(e.value).startswith(message) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_defaults_keep_existing_models_and_cyclegan_knobs_documented():
    c = build_config({})
    assert c.model.family == "gan" and c.data.target is None
    assert (c.loss.cycle_weight, c.loss.identity_weight, c.train.pool_size) == (10.0, 0.0, 50)


def test_prepare_two_domains_on_one_canvas(tmp_path):
    c = cfg()
    p = data.prepare(c.data, 0)
    assert p.x_train.shape[1:] == p.b.x_train.shape[1:] == (1, 28, 28)
    assert p.y_train is not None and p.b.y_val is not None  # kept for evaluation only
    assert (p.x_train[:, :, :4] == -1).all() and (p.x_train[:, :, :, -4:] == -1).all()  # framed like MNIST
    assert p.x_train.min() >= -1 and p.x_train.max() <= 1
    assert p.manifest["dataset"] == "digits" and p.manifest["target"]["dataset"] == "mnist5k"
    data.save_prepared(p, tmp_path)
    q = data.load_prepared(tmp_path)
    assert np.array_equal(q.b.x_val, p.b.x_val) and q.manifest["content_hash"] == p.manifest["content_hash"]


# ---- export and checkpoints ---------------------------------------------------------------------------


def test_both_generators_export_with_parity(tmp_path):
    gan = training.build_gan(cfg(), SHAPE)
    files, diffs = export_translators(gan.G, SHAPE, ["torchscript", "onnx"], tmp_path)
    assert set(files) == {f"generator_{d}.{f}" for d in ("xy", "yx") for f in ("torchscript", "onnx")}
    assert all(v < PARITY_TOL for v in diffs.values()) and len(diffs) == 4
    import onnxruntime as ort

    x = images(7, 9)
    for d, net in (("xy", gan.G.xy), ("yx", gan.G.yx)):
        sess = ort.InferenceSession(str(tmp_path / f"generator_{d}.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - net.eval()(x).numpy()).max() < PARITY_TOL
        ts = torch.jit.load(str(tmp_path / f"generator_{d}.pt"))
        with torch.no_grad():
            assert torch.allclose(ts(x), net(x), atol=PARITY_TOL)


def test_checkpoint_round_trip_resumes_exactly_including_the_pool():
    c = cfg(train={"steps": 4, "checkpoint_every": 2, "pool_size": 3, "ema": 0.9})
    saved = {}

    def on_checkpoint(g, final):
        saved[g.step] = copy.deepcopy(training.gan_state(g))

    full = training.build_gan(c, SHAPE)
    training.train(full, c, batches(c), training.Hooks(on_checkpoint=on_checkpoint))
    mid = saved[2]
    assert len(mid["pools"]["x"]["images"]) == 3 and len(mid["pools"]["y"]["images"]) == 3
    resumed = training.build_gan(c, SHAPE)
    training.load_gan_state(resumed, mid, c)
    assert torch.equal(resumed.pools["y"].images, mid["pools"]["y"]["images"]) and resumed.step == 2
    training.train(resumed, c, batches(c))
    end = training.gan_state(full)
    for key in ("G", "D", "G_ema"):
        for name, v in training.gan_state(resumed)[key].items():
            assert torch.equal(v, end[key][name]), f"{key}.{name}"
    for k in ("x", "y"):
        assert torch.equal(resumed.pools[k].images, full.pools[k].images)


def test_gradient_sync_covers_all_four_nets_with_their_gradients():
    """The multi-worker hook (`Hooks.sync_grads`, an all-reduce under Ray Train) sees every parameter
    of G, F, D_X and D_Y with its gradient in place, before the optimizer steps."""
    c = cfg(train={"steps": 1})
    gan = training.build_gan(c, SHAPE)
    synced: set[int] = set()

    def record(module):
        synced.update(id(p) for p in module.parameters() if p.grad is not None)

    training.train(gan, c, batches(c), training.Hooks(sync_grads=record))
    for net in (gan.G.xy, gan.G.yx, gan.D.x, gan.D.y):
        assert {id(p) for p in net.parameters()} <= synced


def test_tune_trials_report_the_cycle_error():
    from pipeline.ray import tune

    c = cfg(tune={"metric": "cycle_l1", "mode": "min"})
    tune.check_tunable(c)  # accepted as a tune metric
    gan = training.build_gan(c, SHAPE)
    x, y = images(8, 1).numpy(), images(8, 2).numpy()
    m = tune.cycle_metrics(gan.G, c, x, y, 1000)
    xy = cyclegan.cycle_diagnostics(gan.G.xy, gan.G.yx, x, c.seed)["cycle_l1"]
    yx = cyclegan.cycle_diagnostics(gan.G.yx, gan.G.xy, y, c.seed)["cycle_l1"]
    assert set(m) == {"cycle_l1"} and m["cycle_l1"] == pytest.approx((xy + yx) / 2)
