"""pipeline.core.augment.diffaugment (Zhao et al. 2020) and `train.augment` in the config and the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.augment import diffaugment
from pipeline.core.config import ConfigError, build_config


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_determinism():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    a, b = diffaugment(x, _gen(1)), diffaugment(x, _gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, diffaugment(x, _gen(2)))


def test_cutout_zeroes_a_quarter_of_a_constant_image_and_translation_pads_with_zeros():
    # a constant image: colour ops keep it constant (contrast and saturation scale distances to means
    # that are the image itself), so every zero comes from translation padding or cutout
    x = torch.full((64, 1, 16, 16), 0.7)
    out = diffaugment(x, _gen(0))
    zeros = (out == 0).float().mean((1, 2, 3))
    # cutout is an 8x8 square clipped at the border (at most a quarter), translation adds 0..2 rows/columns
    assert (zeros > 0).all()
    assert zeros.max() <= (64 + 2 * 16 * 2 + 4) / 256 + 1e-6
    # what is not zeroed is one brightness-shifted value per image
    for img in out:
        vals = img[img != 0]
        assert torch.allclose(vals, vals[0].expand_as(vals), atol=1e-5)
        assert 0.7 - 0.5 - 1e-5 <= vals[0] <= 0.7 + 0.5 + 1e-5


def test_it_is_differentiable_so_g_learns_through_it():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    diffaugment(x, _gen(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_two_workers_augment_as_one_worker_with_the_whole_batch():
    x = torch.rand(8, 3, 16, 16)
    whole = diffaugment(x, _gen(3))
    halves = [diffaugment(x[r * 4 : (r + 1) * 4], _gen(3), shard=(r, 2)) for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), whole)


def test_points_are_refused():
    with pytest.raises(ValueError, match="diffaugment: expected images"):
        diffaugment(torch.zeros(4, 2), _gen(0))


def test_config_train_augment():
    img = {"data": {"name": "digits"}, "model": {"arch": "dcgan"}}
    assert build_config({**img, "train": {"augment": "diffaugment"}}).train.augment == "diffaugment"
    # ada.enabled and augment: ada imply each other
    cfg = build_config({**img, "train": {"ada": {"enabled": True}}})
    assert cfg.train.augment == "ada" and cfg.train.ada.enabled
    cfg = build_config({**img, "train": {"augment": "ada"}})
    assert cfg.train.augment == "ada" and cfg.train.ada.enabled
    with pytest.raises(ConfigError, match="exclusive"):
        build_config({**img, "train": {"augment": "diffaugment", "ada": {"enabled": True}}})
    with pytest.raises(ConfigError, match="train.augment: diffaugment transforms images"):
        build_config({"train": {"augment": "diffaugment"}})
    with pytest.raises(ConfigError, match="train.augment: must be one of"):
        build_config({**img, "train": {"augment": "flip"}})


def test_training_with_diffaugment_is_deterministic_and_differs_from_none():
    from pipeline.core import training
    from pipeline.core.data import prepare

    raw = {
        "data": {"name": "digits"},
        "model": {"arch": "dcgan", "z_dim": 8, "hidden": 8},
        "train": {"steps": 3, "batch_size": 16, "augment": "diffaugment", "log_every": 1, "ema": 0.0},
        "eval": {"every": 0},
    }

    def weights(raw) -> np.ndarray:
        cfg = build_config(raw)
        gan = training.build_gan(cfg, list(p.x_train.shape[1:]))
        batches = training.Batches(torch.from_numpy(p.x_train), 16, 8, cfg.seed)
        training.train(gan, cfg, batches, training.Hooks())
        return np.concatenate([t.detach().numpy().ravel() for t in gan.G.state_dict().values()])

    p = prepare(build_config(raw).data, 0)
    a, b = weights(raw), weights(raw)
    none = weights({**raw, "train": {**raw["train"], "augment": "none"}})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, none)
