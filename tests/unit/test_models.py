"""pipeline.core.models: shapes, ranges, every discriminator variant, spectral normalisation."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.core.config import ModelConfig
from pipeline.core.models import (
    DCGANGenerator,
    MLPDiscriminator,
    build_discriminator,
    build_generator,
    generator_spec,
)

NORMS = ["none", "batch", "layer", "instance", "spectral"]
ACTS = ["relu", "leaky_relu", "tanh"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- MLP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("z_dim, out_dim, layers", [(2, 2, 3), (5, 3, 1)])
def test_mlp_generator_shape(z_dim, out_dim, layers):
    m = ModelConfig(arch="mlp", z_dim=z_dim, hidden=16, layers=layers)
    spec = generator_spec(m, [out_dim])
    assert spec == {
        "arch": "mlp",
        "z_dim": z_dim,
        "hidden": 16,
        "layers": layers,
        "sample_shape": [out_dim],
        "num_classes": None,
        "conditioning": None,
    }
    G = build_generator(spec)
    x = G(torch.randn(7, z_dim))
    assert x.shape == (7, out_dim)
    assert sum(isinstance(mod, nn.Linear) for mod in G.modules()) == layers + 1


@pytest.mark.parametrize("pack", [1, 2, 4])
@pytest.mark.parametrize("norm", ["none", "batch", "layer", "spectral"])
def test_mlp_discriminator_shape(pack, norm):
    m = ModelConfig(arch="mlp", hidden=16, layers=2, d_norm=norm, pack=pack)
    D = build_discriminator(m, [2])
    out = D(torch.randn(16, 2))
    assert out.shape == (16 // pack,)
    assert torch.isfinite(out).all()


def test_mlp_pack_sees_whole_pack():
    # packing concatenates consecutive samples: changing one sample changes only its pack's score
    D = MLPDiscriminator(2, 16, 2, "none", "leaky_relu", pack=4)
    x = torch.randn(8, 2)
    y = x.clone()
    y[5] += 1.0
    a, b = D(x), D(y)
    assert a[0] == b[0] and a[1] != b[1]


def test_mlp_instance_norm_refused():
    with pytest.raises(ValueError, match="instance"):
        MLPDiscriminator(2, 16, 2, "instance", "relu")


# ---- DCGAN -----------------------------------------------------------------------------------

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dcgan_generator_shape_and_range(shape):
    m = ModelConfig(arch="dcgan", z_dim=8, hidden=8)
    G = build_generator(generator_spec(m, list(shape)))
    assert isinstance(G, DCGANGenerator)
    for mode in (G.train, G.eval):
        mode()
        x = G(3 * torch.randn(5, 8))
        assert x.shape == (5, *shape)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.std() > 0  # not constant


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pack", [1, 4])
def test_dcgan_discriminator_shape(shape, pack):
    m = ModelConfig(arch="dcgan", hidden=8, pack=pack)
    D = build_discriminator(m, list(shape))
    out = D(torch.rand(8, *shape) * 2 - 1)
    assert out.shape == (8 // pack,)
    assert torch.isfinite(out).all()


def test_dcgan_generator_then_discriminator():
    shape = [1, 28, 28]
    m = ModelConfig(arch="dcgan", z_dim=4, hidden=8, pack=2)
    G, D = build_generator(generator_spec(m, shape)), build_discriminator(m, shape)
    out = D(G(torch.randn(6, 4)))
    assert out.shape == (3,)
    out.sum().backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("norm, act", list(itertools.product(NORMS, ACTS)))
def test_dcgan_discriminator_every_norm_and_activation(norm, act):
    shape = [1, 16, 16]  # two levels: the second conv block carries the normalisation
    m = ModelConfig(arch="dcgan", hidden=8, d_norm=norm, d_activation=act)
    D = build_discriminator(m, shape)
    x = torch.rand(6, *shape) * 2 - 1
    out = D(x)
    assert out.shape == (6,) and torch.isfinite(out).all()
    out.mean().backward()
    grads = [p.grad for p in D.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    D.eval()
    with torch.no_grad():
        assert D(x).shape == (6,)
    kinds = {type(mod).__name__ for mod in D.modules()}
    expected_norm = {"batch": "BatchNorm2d", "layer": "GroupNorm", "instance": "InstanceNorm2d"}.get(norm)
    if expected_norm:
        assert expected_norm in kinds
    expected_act = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "tanh": "Tanh"}[act]
    assert expected_act in kinds


# ---- spectral norm ---------------------------------------------------------------------------


def _sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().flatten(1), ord=2))


def test_spectral_norm_bounds_linear_layers():
    D = MLPDiscriminator(2, 32, 2, "spectral", "leaky_relu")
    linears = [mod for mod in D.modules() if isinstance(mod, nn.Linear)]
    assert len(linears) == 3
    with torch.no_grad():
        for lin in linears:
            lin.parametrizations.weight.original.mul_(10.0)  # raw weights far above 1
    assert max(_sigma(lin.parametrizations.weight.original) for lin in linears) > 2.0
    D.train()
    x = torch.randn(64, 2)
    for _ in range(20):
        D(x)
    for lin in linears:
        s = _sigma(lin.weight)  # the effective (normalised) weight
        assert 0.9 < s <= 1.02, s


def test_no_spectral_norm_leaves_weights_alone():
    D = MLPDiscriminator(2, 32, 2, "none", "leaky_relu")
    lin = D.net[0]
    with torch.no_grad():
        lin.weight.mul_(10.0)
    D(torch.randn(8, 2))
    assert _sigma(lin.weight) > 2.0


def test_dcgan_spectral_head_bounded():
    D = build_discriminator(ModelConfig(arch="dcgan", hidden=8, d_norm="spectral"), [1, 8, 8])
    with torch.no_grad():
        D.head.parametrizations.weight.original.mul_(10.0)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(20):
        D(x)
    assert _sigma(D.head.weight) <= 1.02


@pytest.mark.parametrize(
    "arch, shape", [("mlp", (2,)), ("dcgan", (3, 16, 16)), ("resnet", (3, 32, 32))], ids=["mlp", "dcgan", "resnet"]
)
def test_d_hidden_widens_the_discriminator_only(arch, shape):
    """model.d_hidden sets the discriminator's width; the generator keeps model.hidden; null = hidden."""

    def count(net: nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    same = ModelConfig(arch=arch, hidden=16)
    wide = ModelConfig(arch=arch, hidden=16, d_hidden=32)
    assert same.d_width == 16 and wide.d_width == 32
    assert count(build_discriminator(wide, shape)) > 2 * count(build_discriminator(same, shape))
    spec_same, spec_wide = generator_spec(same, shape), generator_spec(wide, shape)
    assert spec_same == spec_wide  # the generator (and the exported file's spec) does not change
    assert count(build_generator(spec_wide)) == count(build_generator(spec_same))
    x = torch.randn(4, *shape)
    assert build_discriminator(wide, shape)(x).shape == (4,)
