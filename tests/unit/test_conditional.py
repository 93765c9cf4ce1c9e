"""Conditional GANs: the label steers G, D's projection head sees the label, export takes y."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core import data, layers, models, training
from pipeline.core.config import ConfigError, build_config
from pipeline.io import export

CFG = {
    "data": {"name": "digits"},
    "model": {"arch": "dcgan", "z_dim": 8, "hidden": 8, "conditional": True},
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "checkpoint_every": 4},
}


@pytest.fixture(scope="module")
def digits():
    cfg = build_config(CFG)
    return cfg, data.prepare(cfg.data, cfg.seed)


def test_changing_the_label_changes_the_generated_image(digits):
    cfg, p = digits
    gan = training.build_gan(cfg, list(p.x_train.shape[1:]), num_classes=10)
    G = gan.G.eval()
    cbn = [m for m in G.modules() if isinstance(m, layers.ConditionalBatchNorm)]
    plain = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine]
    assert cbn and not plain  # every batch norm of the generator takes the label
    for m in cbn:  # per-class gains and biases start at 1 and 0 (label-blind); give them values
        torch.nn.init.normal_(m.gain.weight, 1.0, 0.5)
        torch.nn.init.normal_(m.bias.weight, 0.0, 0.5)
    z = torch.randn(1, 8).repeat(10, 1)
    with torch.no_grad():
        out = G(z, torch.arange(10))
    assert all(not torch.allclose(out[0], out[k]) for k in range(1, 10))


def test_discriminator_scores_depend_on_the_label(digits):
    cfg, p = digits
    gan = training.build_gan(cfg, list(p.x_train.shape[1:]), num_classes=10)
    x = torch.from_numpy(p.x_train[:4])
    gan.D.eval()
    torch.nn.init.normal_(gan.D.project.embed.weight)
    assert not torch.allclose(gan.D(x, torch.zeros(4, dtype=torch.long)), gan.D(x, torch.ones(4, dtype=torch.long)))


def test_real_batches_reach_d_with_their_own_labels(digits):
    cfg, p = digits
    b = training.Batches(torch.from_numpy(p.x_train), 16, 8, 0, y=torch.from_numpy(p.y_train), num_classes=10)
    x, y = b.reals(3, 0), b.real_labels(3, 0)
    for xi, yi in zip(x, y):
        match = (torch.from_numpy(p.x_train) == xi).flatten(1).all(1)
        assert int(torch.from_numpy(p.y_train)[match][0]) == int(yi)


def test_conditional_training_runs_and_exports_with_a_label_input(digits, tmp_path):
    cfg, p = digits
    gan = training.build_gan(cfg, list(p.x_train.shape[1:]), num_classes=10)
    b = training.Batches(torch.from_numpy(p.x_train), 16, 8, 0, y=torch.from_numpy(p.y_train), num_classes=10)
    training.train(gan, cfg, b)
    files, diffs = export.export_all(gan.G, 8, ["torchscript", "onnx"], tmp_path, num_classes=10)
    assert all(v < 1e-4 for v in diffs.values())
    import onnxruntime as ort

    sess = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["z", "y"]
    out = sess.run(None, {"z": np.zeros((3, 8), np.float32), "y": np.array([0, 1, 2], np.int64)})[0]
    assert out.shape == (3, 1, 8, 8) and not np.allclose(out[0], out[1])


def test_conditional_needs_labels():
    with pytest.raises(ConfigError, match="model.conditional: grid has no class labels"):
        build_config({"model": {"conditional": True}})
    with pytest.raises(ConfigError, match="model.pack: conditional"):
        build_config({**CFG, "model": {**CFG["model"], "pack": 2}})
    cfg = build_config(CFG)
    with pytest.raises(ValueError, match="model.conditional: needs labelled data"):
        training.build_gan(cfg, [1, 8, 8])


def test_generators_saved_before_conditional_batch_norm_still_load(digits):
    """A spec without `conditioning` (older checkpoints) rebuilds the z + label-embedding generator."""
    cfg, p = digits
    spec = training.build_gan(cfg, list(p.x_train.shape[1:]), num_classes=10).spec
    assert spec["conditioning"] == "batchnorm"
    old = {k: v for k, v in spec.items() if k != "conditioning"}
    G = models.build_generator(old).eval()
    assert G.cond.embed is not None and not any(isinstance(m, layers.ConditionalBatchNorm) for m in G.modules())
    with torch.no_grad():
        assert G(torch.randn(3, 8), torch.tensor([0, 1, 2])).shape == (3, *p.x_train.shape[1:])
