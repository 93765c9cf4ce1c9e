"""Every loss x discriminator-normalisation combination trains a few steps on the 2D grid without NaN,
and every loss has a preset that validates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.core import data, training
from pipeline.core.config import LOSSES, ConfigError, build_config, deep_merge, read_yaml

ROOT = Path(__file__).resolve().parents[2]
NORMS = ["none", "batch", "layer", "spectral"]  # instance norm is for images (refused for mlp)


@pytest.fixture(scope="module")
def grid():
    cfg = build_config({"data": {"name": "grid", "n_samples": 1000}})
    return torch.from_numpy(data.prepare(cfg.data, 0).x_train)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_and_norm_trains_without_nan(grid, loss, norm):
    if loss in ("wgan", "wgan-gp") and norm == "batch":
        with pytest.raises(ConfigError, match="model.d_norm: batch norm couples"):
            build_config({"loss": {"name": loss}, "model": {"d_norm": "batch"}})
        return
    cfg = build_config(
        {
            "data": {"name": "grid", "n_samples": 1000},
            "model": {"hidden": 16, "d_norm": norm},
            "loss": {"name": loss, "r1_gamma": 0.1},
            "train": {"steps": 8, "batch_size": 32, "n_critic": 2, "log_every": 4, "checkpoint_every": 8},
        }
    )
    gan = training.build_gan(cfg, [2])
    before = [p.detach().clone() for p in gan.G.parameters()]
    logged = []
    training.train(gan, cfg, training.Batches(grid, 32, 2, 0), training.Hooks(on_log=lambda s, st: logged.append(st)))
    assert all(math.isfinite(v) for st in logged for k, v in st.items() if k.startswith("loss/"))
    assert any(not torch.equal(a, b) for a, b in zip(before, gan.G.parameters()))  # G did learn


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_has_a_valid_preset(loss):
    preset = ROOT / "presets" / f"{loss}-grid.yaml"
    cfg = build_config(deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(preset)))
    assert cfg.loss.name == loss and cfg.data.name == "grid"
