"""Mixed precision: bf16 autocast trains on CPU; fp16 is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch

from pipeline.core import data, training
from pipeline.core.config import ConfigError, build_config


def tiny(**train):
    return build_config(
        {
            "data": {"name": "digits"},
            "model": {"arch": "dcgan", "z_dim": 8, "hidden": 8},
            "loss": {"r1_gamma": 0.0},
            "train": {"steps": 6, "batch_size": 16, "log_every": 3, "checkpoint_every": 6, **train},
        }
    )


def run(cfg):
    p = data.prepare(cfg.data, cfg.seed)
    gan = training.build_gan(cfg, list(p.x_train.shape[1:]))
    seen = []
    hooks = training.Hooks(on_log=lambda step, stats: seen.append(stats))
    training.train(gan, cfg, training.Batches(torch.from_numpy(p.x_train), 16, 8, cfg.seed), hooks)
    return gan, seen


def test_bf16_autocast_trains_on_cpu_and_really_changes_the_arithmetic():
    g32, s32 = run(tiny(precision="fp32"))
    g16, s16 = run(tiny(precision="bf16"))
    assert all(torch.isfinite(torch.tensor(s["loss/D"])) for s in s16)
    w32, w16 = g32.G.state_dict(), g16.G.state_dict()
    diffs = [float((w32[k].float() - w16[k].float()).abs().max()) for k in w32 if w32[k].is_floating_point()]
    assert max(diffs) > 0  # bf16 rounding did happen
    assert s16[-1]["loss/D"] == pytest.approx(s32[-1]["loss/D"], rel=0.1)  # but the same training


def test_fp16_needs_a_gpu():
    with pytest.raises(ValueError, match="train.precision: fp16 needs a GPU"):
        run(tiny(precision="fp16"))


def test_fp16_with_gradient_penalty_is_refused():
    with pytest.raises(ConfigError, match="train.precision: fp16 loss scaling does not cover"):
        build_config({"loss": {"name": "wgan-gp"}, "train": {"precision": "fp16"}})


def test_channels_last_builds_conv_models_in_that_format():
    gan, _ = run(tiny(channels_last=True))
    w = next(p for p in gan.D.parameters() if p.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)
