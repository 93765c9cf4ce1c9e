"""pipeline.core.resnet: the residual GAN's shapes and ranges at every resolution it takes, conditioning,
packing, its self-attention starting as the identity, and spectral norm bounding every layer."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ConfigError, ModelConfig, build_config
from pipeline.core.models import ARCHS, build_discriminator, build_generator, generator_spec
from pipeline.core.resnet import ResNetDiscriminator, SelfAttention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", [[3, 16, 16], [3, 32, 32], [1, 28, 28], [3, 48, 48], [3, 64, 64]])
def test_generator_and_discriminator_shapes(shape):
    m = ModelConfig(arch="resnet", z_dim=16, hidden=8, d_norm="spectral")
    G = build_generator(generator_spec(m, shape))
    D = build_discriminator(m, shape)
    x = G(torch.randn(6, 16))
    assert x.shape == (6, *shape)
    assert x.abs().max() <= 1.0
    assert D(x).shape == (6,)


def test_conditional_generator_draws_by_class_and_discriminator_projects():
    m = ModelConfig(arch="resnet", z_dim=8, hidden=8, conditional=True, d_norm="spectral")
    spec = generator_spec(m, [3, 16, 16], num_classes=4)
    assert spec["conditioning"] == "batchnorm"
    G, D = build_generator(spec), build_discriminator(m, [3, 16, 16], 4)
    with torch.no_grad():  # per-class gains and biases start at 1 and 0: make them differ, as training does
        for name, p in G.named_parameters():
            if name.endswith(("gain.weight", "bias.weight")):
                p.add_(0.5 * torch.randn_like(p))
    G.eval()  # running statistics: each sample alone, so the label is the only difference
    z = torch.randn(1, 8).repeat(4, 1)
    x = G(z, torch.arange(4))
    assert not torch.allclose(x[0], x[1])
    s = D(x.detach(), torch.arange(4))
    s_other = D(x.detach(), torch.tensor([1, 2, 3, 0]))
    assert not torch.allclose(s, s_other)  # the projection term reads the label


def test_packing_stacks_samples_on_channels():
    m = ModelConfig(arch="resnet", z_dim=8, hidden=8, pack=2)
    D = build_discriminator(m, [3, 16, 16])
    assert D(torch.randn(8, 3, 16, 16)).shape == (4,)


def test_self_attention_starts_as_the_identity_and_then_mixes_positions():
    a = SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(a(x), x)
    with torch.no_grad():
        a.gamma.fill_(1.0)
    y = a(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0  # one position changes: every other position's output changes too
    assert not torch.allclose(a(x2)[:, :, 7, 7], y[:, :, 7, 7])


def test_attention_is_placed_at_the_named_resolution():
    m = ModelConfig(arch="resnet", z_dim=8, hidden=8, attention=16)
    G = build_generator(generator_spec(m, [3, 32, 32]))
    D = build_discriminator(m, [3, 32, 32])
    assert len(G.attn) == 1 and len(D.attn) == 1
    # G's block i outputs 8 * 2**i pixels; D's block i takes 32 / 2**i
    assert list(G.attn) == ["1"] and list(D.attn) == ["1"]


def test_spectral_norm_bounds_every_layer_of_the_discriminator():
    D = ResNetDiscriminator((3, 32, 32), 8, "spectral", "relu")
    D.train()
    for _ in range(30):  # power iterations converge
        D(torch.randn(4, 3, 32, 32))
    D.eval()
    for name, mod in D.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            w = mod.weight.detach().flatten(1)
            assert torch.linalg.matrix_norm(w, ord=2) <= 1.05, name


def test_sizes_outside_its_range_are_refused_with_the_key():
    with pytest.raises(ValueError, match=r"model.arch: takes 1 or 3 channels and sides 16..256"):
        ARCHS["resnet"].check_shape([3, 8, 8])
    with pytest.raises(ValueError, match="sides 16..256"):
        ARCHS["resnet"].check_shape([3, 512, 512])


def test_config_refuses_resnet_on_points_and_attention_elsewhere():
    with pytest.raises(ConfigError, match=r"model.arch: 2D data \(grid\) needs mlp, got resnet"):
        build_config({"model": {"arch": "resnet"}})
    with pytest.raises(ConfigError, match="model.attention: only arch resnet"):
        build_config({"data": {"name": "digits"}, "model": {"arch": "dcgan", "attention": 8}})
    with pytest.raises(ConfigError, match="model.attention: must be a power of two"):
        build_config({"data": {"name": "digits"}, "model": {"arch": "resnet", "attention": 12}})
    assert build_config({"data": {"name": "mnist5k"}, "model": {"arch": "resnet", "attention": 16}})


def test_a_resolution_the_model_cannot_take_fails_before_prepare():
    with pytest.raises(ConfigError, match=r"model.arch: takes 1 or 3 channels and sides 16..256, got \(3, 8, 8\)"):
        build_config({"data": {"name": "shapes", "resolution": 8}, "model": {"arch": "resnet"}})
    with pytest.raises(ConfigError, match="sides 8..128, got \\(3, 256, 256\\) \\(data.resolution 256\\)"):
        build_config({"data": {"name": "shapes", "resolution": 256}, "model": {"arch": "dcgan"}})
