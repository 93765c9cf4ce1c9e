"""Building blocks the architectures share (pipeline.core.models: MLP and DCGAN; pipeline.core.resnet), and the
records of the two registries: `Norm` (with `NORMS`, the discriminator normalisations) and `Arch`.

Pure torch, no import from the rest of the package: every architecture module imports this one, and
pipeline.core.models gathers the architectures into `ARCHS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": lambda: nn.Tanh(),
}


class Projection(nn.Module):
    """Projection discriminator head (Miyato & Koyama 2018): score = head(h) + <embed(y), h>."""

    def __init__(self, features: int, num_classes: int | None, sn):
        super().__init__()
        self.embed = sn(nn.Embedding(num_classes, features)) if num_classes else None

    def forward(self, h: torch.Tensor, score: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return score
        assert y is not None, "a conditional discriminator needs labels y"
        return score + (self.embed(y) * h).sum(1)


def levels(shape: tuple[int, ...]) -> int:
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


class ConditionalBatchNorm(nn.Module):
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


def batch_norm(ch: int, dims: int, num_classes: int | None, conditioning: str) -> nn.Module:
    if num_classes and conditioning == "batchnorm":
        return ConditionalBatchNorm(ch, num_classes, dims)
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(ch)


def apply_layers(layers: nn.Sequential, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, y) if isinstance(layer, ConditionalBatchNorm) else layer(x)
    return x


def conv_norm(kind: str, ch: int) -> list[nn.Module]:
    return NORMS[kind].conv(ch)


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


def image_sides(lo: int, hi: int) -> Callable[[list[int]], None]:
    def check(shape) -> None:
        c, h, w = shape
        if c not in (1, 3) or not (lo <= h <= hi and lo <= w <= hi):
            raise ValueError(f"model.arch: takes 1 or 3 channels and sides {lo}..{hi}, got {tuple(shape)}")

    return check
