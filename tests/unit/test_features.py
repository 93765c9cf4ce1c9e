"""pipeline.core.features: the extractor's shapes, determinism, accuracy on digits, files, and the metrics
computed through it. (MNIST-5k accuracy and timing: benchmarks/bench_image_eval.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from pipeline.core import features as F
from pipeline.core import metrics_image as M
from pipeline.core import protocol
from pipeline.core.config import DataConfig
from pipeline.core.data import prepare


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(1):  # see test_metrics_image.py
        yield


@pytest.fixture(scope="module")
def digits():
    return prepare(DataConfig(name="digits", val_fraction=0.1), 0)


@pytest.fixture(scope="module")
def trained(digits):
    return F.train_extractor(digits.x_train, digits.y_train, 10, seed=0, x_val=digits.x_val, y_val=digits.y_val)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 8, 64), (1, 13, 9)])
def test_featurenet_shapes(shape):
    net = F.FeatureNet(shape, num_classes=7).eval()
    x = torch.rand(5, *shape) * 2 - 1
    assert net.features(x).shape == (5, F.FEATURE_DIM)
    assert net(x).shape == (5, 7)
    assert (net.features(x) >= 0).all()


def test_featurenet_rejects_bad_sides():
    with pytest.raises(AssertionError, match="8..256"):
        F.FeatureNet((1, 4, 4), 10)
    with pytest.raises(AssertionError, match="8..256"):
        F.FeatureNet((3, 512, 512), 10)


def test_extractor_reaches_97_percent_on_digits(trained):
    model, info = trained
    assert info["extractor"] == "classifier"
    assert info["val_accuracy"] >= 0.97 and info["n_val"] == 180
    assert info["epochs"] == F.default_epochs(1617, 128)


def test_training_is_reproducible_and_depends_on_the_seed(digits, tmp_path):
    x, y = digits.x_train[:600], digits.y_train[:600]
    before = torch.get_rng_state()
    a, info_a = F.train_extractor(x, y, 10, seed=5, epochs=2)
    torch.rand(3)  # disturbing the global generator must not matter
    b, info_b = F.train_extractor(x, y, 10, seed=5, epochs=2)
    c, _ = F.train_extractor(x, y, 10, seed=6, epochs=2)
    sa, sb, sc = state(a), state(b), state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # the saved file too (no wall time in it): its hash, in every evaluation's protocol and in the run
    # identity of the trainings scored in it, is the same for two runs of the features stage
    # (torch.save names its archive after the file: the same name, as the stage writes)
    F.save_extractor(a, info_a, tmp_path / "a" / "extractor.pt")
    F.save_extractor(b, info_b, tmp_path / "b" / "extractor.pt")
    assert (tmp_path / "a" / "extractor.pt").read_bytes() == (tmp_path / "b" / "extractor.pt").read_bytes()
    assert protocol.extractor_hash(tmp_path / "a" / "extractor.pt") == protocol.extractor_hash(
        tmp_path / "b" / "extractor.pt"
    )
    torch.set_rng_state(before)
    F.train_extractor(x[:50], y[:50], 10, seed=5, epochs=1)
    assert torch.equal(torch.get_rng_state(), before), "training must leave the caller's RNG alone"


def test_random_shift_moves_content_by_at_most_max_shift():
    x = -torch.ones(400, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    out = F.random_shift(x, 2, torch.Generator().manual_seed(0))
    pos = (out[:, 0] == 1.0).flatten(1).float().argmax(1)
    dy, dx = pos // 9 - 4, pos % 9 - 4
    assert (out == 1.0).flatten(1).sum(1).eq(1).all()  # the pixel survives, exactly once
    assert dy.abs().max() == 2 and dx.abs().max() == 2  # all shifts occur ...
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # ... each of the 5 x 5
    assert torch.equal(F.random_shift(x, 0, torch.Generator()), x)
    again = F.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_embed_is_batch_size_and_order_invariant(trained, digits):
    model, _ = trained
    x = digits.x_val
    f500, p500 = F.embed(model, x)
    f7, p7 = F.embed(model, x, batch_size=7)
    assert f500.dtype == np.float64 and f500.shape == (180, F.FEATURE_DIM) and p500.shape == (180, 10)
    np.testing.assert_allclose(f7, f500, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p500.sum(1), 1.0, atol=1e-6)
    perm = np.random.default_rng(0).permutation(len(x))
    np.testing.assert_allclose(F.embed(model, x[perm])[0], f500[perm], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        F.embed(model, np.zeros((3, 1, 28, 28), np.float32))
    before = state(model)
    model.train()  # embed must switch BatchNorm to its running statistics, and not update them
    np.testing.assert_allclose(F.embed(model, x, batch_size=60)[0], f500, rtol=1e-5, atol=1e-5)
    assert model.training, "embed restores the train/eval mode"
    model.eval()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_metrics_do_not_depend_on_embed_batch_size(trained, digits):
    model, _ = trained
    real = F.embed(model, digits.x_train[:400], batch_size=64)
    fake = F.embed(model, digits.x_val, batch_size=64)
    m64 = M.image_metrics(*real, *fake, 10)
    real = F.embed(model, digits.x_train[:400], batch_size=500)
    fake = F.embed(model, digits.x_val, batch_size=500)
    m500 = M.image_metrics(*real, *fake, 10)
    for k in m64:
        assert m500[k] == pytest.approx(m64[k], rel=1e-4, abs=1e-6), k


def test_metrics_through_the_extractor(trained, digits):
    """Real held-out data scores near the floor; noise and a single class are clearly worse."""
    model, info = trained
    real = F.embed(model, digits.x_train)
    val = F.embed(model, digits.x_val)
    floor = M.image_metrics(*real, *val, 10)
    assert floor["class_modes"] == 10 and floor["class_kl"] < 0.05
    assert floor["precision"] > 0.5 and floor["recall"] > 0.7  # 180 vs 1,617 samples: about 0.7 and 0.9
    assert M.label_accuracy(val[1], digits.y_val) == pytest.approx(info["val_accuracy"])
    noise = F.embed(model, np.random.default_rng(0).uniform(-1, 1, digits.x_val.shape).astype(np.float32))
    bad = M.image_metrics(*real, *noise, 10)
    assert bad["fid"] > 10 * floor["fid"] and bad["kid"] > 10 * floor["kid"]
    assert bad["precision"] < 0.2 and bad["coverage"] < 0.2
    zeros = digits.x_train[digits.y_train == 0][:180]
    one = M.image_metrics(*real, *F.embed(model, zeros), 10)
    assert one["class_modes"] == 1 and one["class_kl"] > 2.0  # about log(10) = 2.3
    assert one["coverage"] < 0.2 and one["recall"] < 0.2 and one["precision"] > 0.8


def test_save_and_load_round_trip(trained, digits, tmp_path):
    model, info = trained
    path = tmp_path / "sub" / "extractor.pt"
    F.save_extractor(model, info, path)
    loaded, info2 = F.load_extractor(path)
    assert info2 == info and not loaded.training
    np.testing.assert_array_equal(F.embed(loaded, digits.x_val)[0], F.embed(model, digits.x_val)[0])
    with pytest.raises(FileNotFoundError, match="not found"):
        F.load_extractor(tmp_path / "missing.pt")


def test_random_extractor_is_labelled_seeded_and_still_separates(digits):
    a, info = F.random_extractor((1, 8, 8), seed=1)
    b, _ = F.random_extractor((1, 8, 8), seed=1)
    c, _ = F.random_extractor((1, 8, 8), seed=2)
    assert info["extractor"] == "random-init" and not a.training
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.head.weight, c.head.weight)
    real, val = F.embed(a, digits.x_train)[0], F.embed(a, digits.x_val)[0]
    assert real.std() > 0.1  # He init keeps the activations' scale (the default init shrinks it ~30x)
    noise = F.embed(a, np.random.default_rng(0).uniform(-1, 1, digits.x_val.shape).astype(np.float32))[0]
    assert M.fid(real, noise) > 5 * M.fid(real, val)
