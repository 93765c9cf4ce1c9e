"""Generators and discriminators: an MLP pair for 2D points, a DCGAN pair for 8x8..128x128 images
(and, registered from pipeline.resnet, residual GANs for 16..256 pixels): the `ARCHS` registry.

Pure torch: no I/O. A generator is fully described by its `spec` (a small dict saved inside every
checkpoint), so evaluation and export rebuild it without the training config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

if TYPE_CHECKING:  # the config asks this module's registries (ARCHS, NORMS); no import cycle at run time
    from pipeline.config import ModelConfig

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": lambda: nn.Tanh(),
}


def generator_spec(
    model: ModelConfig, sample_shape: list[int] | tuple[int, ...], num_classes: int | None = None
) -> dict[str, Any]:
    """`num_classes` is set for conditional models (G(z, y)), None otherwise."""
    return {
        "arch": model.arch,
        "z_dim": model.z_dim,
        "hidden": model.hidden,
        "layers": model.layers,
        "sample_shape": list(sample_shape),
        "num_classes": num_classes if model.conditional else None,
        # how a conditional image generator takes its label: per-class gain and bias in every batch norm.
        # Specs saved before this key existed concatenated an embedding to z ("embedding").
        "conditioning": "batchnorm" if model.conditional and ARCHS[model.arch].kind == "images" else None,
        **({"attention": model.attention} if model.attention else {}),
    }


def build_generator(spec: dict[str, Any]) -> nn.Module:
    if spec.get("family") == "cyclegan":  # the generator pair G: X -> Y, F: Y -> X
        from pipeline.cyclegan import build_generators

        return build_generators(spec)
    return ARCHS[spec["arch"]].generator(spec)


def build_discriminator(
    model: ModelConfig, sample_shape: list[int] | tuple[int, ...], num_classes: int | None = None
) -> nn.Module:
    if model.family == "cyclegan":  # D_X and D_Y
        from pipeline.cyclegan import CycleDiscriminators

        return CycleDiscriminators(model, tuple(sample_shape))
    return ARCHS[model.arch].discriminator(model, tuple(sample_shape), num_classes if model.conditional else None)


# ---- MLP (2D) -------------------------------------------------------------------------------


class _LabelInput(nn.Module):
    """Conditional input: z (N, z_dim) and labels y (N,) -> [z, embed(y)] (N, 2 * z_dim); z alone when
    unconditional."""

    def __init__(self, z_dim: int, num_classes: int | None):
        super().__init__()
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.width = z_dim * (2 if num_classes else 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return z
        assert y is not None, "a conditional generator needs labels y"
        return torch.cat([z, self.embed(y)], 1)


class _Projection(nn.Module):
    """Projection discriminator head (Miyato & Koyama 2018): score = head(h) + <embed(y), h>."""

    def __init__(self, features: int, num_classes: int | None, sn):
        super().__init__()
        self.embed = sn(nn.Embedding(num_classes, features)) if num_classes else None

    def forward(self, h: torch.Tensor, score: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return score
        assert y is not None, "a conditional discriminator needs labels y"
        return score + (self.embed(y) * h).sum(1)


class MLPGenerator(nn.Module):
    def __init__(self, z_dim: int, hidden: int, layers: int, out_dim: int, num_classes: int | None = None):
        super().__init__()
        self.cond = _LabelInput(z_dim, num_classes)
        dims = [self.cond.width] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(dims[-1], out_dim))
        self.z_dim = z_dim

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.cond(z, y))


def _mlp_norm(kind: str, width: int) -> list[nn.Module]:
    make = NORMS[kind].dense
    if make is None:
        raise ValueError(f"model.d_norm: {kind} norm needs image data (a convolutional arch)")
    return make(width)


class MLPDiscriminator(nn.Module):
    """Scores packs of `pack` points: input (B, D) with B divisible by pack -> (B // pack,)."""

    def __init__(
        self, in_dim: int, hidden: int, layers: int, norm: str, act: str, pack: int = 1, num_classes: int | None = None
    ):
        super().__init__()
        self.pack = pack
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        dims = [in_dim * pack] + [hidden] * layers
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(sn(nn.Linear(a, b)))
            if i > 0:  # no normalisation right on the input
                blocks += _mlp_norm(norm, b)
            blocks.append(ACTIVATIONS[act]())
        self.net = nn.Sequential(*blocks)
        self.head = sn(nn.Linear(dims[-1], 1))
        self.project = _Projection(dims[-1], num_classes, sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.net(x.reshape(x.shape[0] // self.pack, -1))
        return self.project(h, self.head(h).squeeze(1), y)


# ---- DCGAN (images) -------------------------------------------------------------------------


def _levels(shape: tuple[int, ...]) -> int:
    """Number of 2x up/down-samplings between 4x4 and the smallest power of two >= the image."""
    side = max(shape[1], shape[2])
    return max(1, math.ceil(math.log2(side / 4)))


def centre_crop(x: torch.Tensor, side: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Images drawn on a side x side square, cut to (C, H, W) `shape` around the centre."""
    top, left = (side - shape[1]) // 2, (side - shape[2]) // 2
    return x[:, :, top : top + shape[1], left : left + shape[2]]


def pad_to_side(x: torch.Tensor, side: int) -> torch.Tensor:
    """Images padded with background (-1) to side x side around the centre (no-op when they are)."""
    h, w = x.shape[2], x.shape[3]
    if (h, w) == (side, side):
        return x
    top, left = (side - h) // 2, (side - w) // 2
    return nn.functional.pad(x, (left, side - w - left, top, side - h - top), value=-1.0)


class _ConditionalBatchNorm(nn.Module):
    """Batch norm with a per-class gain and bias (de Vries et al. 2017, as in SN-GAN and BigGAN).

    The label modulates every layer of the generator instead of sharing its input with z: a label
    concatenated to z can grow until the generator ignores z and draws one image per class.
    """

    def __init__(self, num_features: int, num_classes: int, dims: int):
        super().__init__()
        self.bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return self.bn(x) * self.gain(y).view(shape) + self.bias(y).view(shape)


def _batch_norm(ch: int, dims: int, num_classes: int | None, conditioning: str) -> nn.Module:
    if num_classes and conditioning == "batchnorm":
        return _ConditionalBatchNorm(ch, num_classes, dims)
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(ch)


def _apply(layers: nn.Sequential, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, y) if isinstance(layer, _ConditionalBatchNorm) else layer(x)
    return x


class DCGANGenerator(nn.Module):
    """z (N, z_dim) -> images (N, C, H, W) in [-1, 1]; drawn at 4 * 2**levels, centre-cropped.

    Conditional (`num_classes` set): `conditioning="batchnorm"` gives every batch norm a per-class gain
    and bias; `"embedding"` (older checkpoints) concatenates a label embedding to z.
    """

    def __init__(
        self,
        z_dim: int,
        base: int,
        shape: tuple[int, int, int],
        num_classes: int | None = None,
        conditioning: str = "batchnorm",
    ):
        super().__init__()
        self.z_dim, self.shape = z_dim, shape
        self.cond = _LabelInput(z_dim, num_classes if conditioning == "embedding" else None)
        n = _levels(shape)
        ch = [base * 2 ** (n - 1 - i) for i in range(n)] + [shape[0]]
        self.fc = nn.Sequential(
            nn.Linear(self.cond.width, ch[0] * 16), _batch_norm(ch[0] * 16, 1, num_classes, conditioning), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks.append(nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=i == n - 1))
            blocks += [nn.Tanh()] if i == n - 1 else [_batch_norm(ch[i + 1], 2, num_classes, conditioning), nn.ReLU()]
        self.net = nn.Sequential(*blocks)
        self.c0, self.side = ch[0], 4 * 2**n
        self.needs_label = bool(num_classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert y is not None or not self.needs_label, "a conditional generator needs labels y"
        h = _apply(self.fc, self.cond(z, y), y)
        x = _apply(self.net, h.view(-1, self.c0, 4, 4), y)
        return centre_crop(x, self.side, self.shape)


def _conv_norm(kind: str, ch: int) -> list[nn.Module]:
    return NORMS[kind].conv(ch)


class DCGANDiscriminator(nn.Module):
    """Images (B, C, H, W), B divisible by pack -> scores (B // pack,). Packs stack on channels."""

    def __init__(
        self, shape: tuple[int, int, int], base: int, norm: str, act: str, pack: int = 1, num_classes: int | None = None
    ):
        super().__init__()
        self.pack, self.shape = pack, shape
        n = _levels(shape)
        self.side = 4 * 2**n
        ch = [shape[0] * pack] + [base * 2**i for i in range(n)]
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks.append(sn(nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1)))
            if i > 0:
                blocks += _conv_norm(norm, ch[i + 1])
            blocks.append(ACTIVATIONS[act]())
        self.net = nn.Sequential(*blocks)
        self.head = sn(nn.Linear(ch[-1] * 16, 1))
        self.project = _Projection(ch[-1] * 16, num_classes, sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c, h, w = self.shape
        x = x.reshape(x.shape[0] // self.pack, c * self.pack, h, w)
        x = pad_to_side(x, self.side)
        h = self.net(x).flatten(1)
        return self.project(h, self.head(h).squeeze(1), y)


# ---- registries: the discriminator norms and the architectures ------------------------------


@dataclass(frozen=True)
class Norm:
    """A discriminator normalisation: the layers it adds after a dense layer (None: it needs images)
    and after a convolution. Spectral norm adds no layer: it reparametrises the weights (`sn`)."""

    dense: Callable[[int], list[nn.Module]] | None
    conv: Callable[[int], list[nn.Module]]
    couples_samples: bool = False  # batch statistics mix the samples of a batch


NORMS: dict[str, Norm] = {
    "none": Norm(lambda w: [], lambda c: []),
    "batch": Norm(lambda w: [nn.BatchNorm1d(w)], lambda c: [nn.BatchNorm2d(c)], couples_samples=True),
    "layer": Norm(lambda w: [nn.LayerNorm(w)], lambda c: [nn.GroupNorm(1, c)]),
    "instance": Norm(None, lambda c: [nn.InstanceNorm2d(c, affine=True)]),
    "spectral": Norm(lambda w: [], lambda c: []),
}


def _any_shape(shape) -> None:
    return None


@dataclass(frozen=True)
class Arch:
    """An architecture: the data kind it takes (points | images), how it builds G from a spec and D
    from the model config, and `check_shape`, which raises ValueError for a sample shape it cannot take."""

    kind: str
    generator: Callable[[dict[str, Any]], nn.Module]
    discriminator: Callable[..., nn.Module]  # (model config, sample shape, num_classes or None)
    check_shape: Callable[[list[int]], None] = _any_shape


def _image_sides(lo: int, hi: int) -> Callable[[list[int]], None]:
    def check(shape) -> None:
        c, h, w = shape
        if c not in (1, 3) or not (lo <= h <= hi and lo <= w <= hi):
            raise ValueError(f"model.arch: takes 1 or 3 channels and sides {lo}..{hi}, got {tuple(shape)}")

    return check


ARCHS: dict[str, Arch] = {
    "mlp": Arch(
        "points",
        lambda s: MLPGenerator(s["z_dim"], s["hidden"], s["layers"], s["sample_shape"][0], s.get("num_classes")),
        lambda m, shape, k: MLPDiscriminator(shape[0], m.hidden, m.layers, m.d_norm, m.d_activation, m.pack, k),
    ),
    "dcgan": Arch(
        "images",
        lambda s: DCGANGenerator(
            s["z_dim"],
            s["hidden"],
            tuple(s["sample_shape"]),
            s.get("num_classes"),
            s.get("conditioning") or "embedding",
        ),
        lambda m, shape, k: DCGANDiscriminator(shape, m.hidden, m.d_norm, m.d_activation, m.pack, k),
        _image_sides(8, 128),
    ),
}


def register_arch(name: str, arch: Arch) -> Arch:
    """Add an architecture (pipeline.resnet registers `resnet`)."""
    ARCHS[name] = arch
    return arch


from pipeline import resnet  # noqa: E402,F401  (registers itself in ARCHS)
