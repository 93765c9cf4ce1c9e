"""Residual GANs for images at 32 to 256 pixels (SN-GAN, Miyato et al. 2018; BigGAN, Brock et al. 2019).

Generator: z -> a 4x4 map, one residual up-block per doubling (batch norm, ReLU, nearest 2x up, 3x3
conv, twice, with a 1x1 shortcut), then batch norm, ReLU, a 3x3 conv to the image and tanh.
Conditional generators take the label through a per-class gain and bias in every batch norm.

Discriminator: one residual down-block per halving down to 4x4 (the first one "optimised": conv
before activation), ReLU, global sum pooling, a linear head plus the projection term <embed(y), h>
for conditional models (Miyato & Koyama 2018). `model.d_norm: spectral` puts spectral norm on every
layer, as in SN-GAN; other norms follow each block's first convolution.

`model.attention` puts a self-attention block (SAGAN, Zhang et al. 2019) at that resolution in both
networks. `model.hidden` is the base width: a block at level i has hidden * 2**min(i, 3) channels
(the discriminator's base is `model.d_hidden` when set).
Images whose side is not a power of two are drawn at the next one and centre-cropped (G), padded (D).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.core import layers

MIN_SIDE, MAX_SIDE = 16, 256


def _width(base: int, i: int) -> int:
    return base * 2 ** min(i, 3)


class SelfAttention(nn.Module):
    """x + gamma * attention(x) over all positions; gamma starts at 0, so the block starts as identity."""

    def __init__(self, ch: int, sn=lambda m: m):
        super().__init__()
        self.q = sn(nn.Conv2d(ch, max(1, ch // 8), 1, bias=False))
        self.k = sn(nn.Conv2d(ch, max(1, ch // 8), 1, bias=False))
        self.v = sn(nn.Conv2d(ch, max(1, ch // 2), 1, bias=False))
        self.o = sn(nn.Conv2d(max(1, ch // 2), ch, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)  # (B, HW, c/8)
        k = self.k(x).flatten(2)  # (B, c/8, HW)
        v = self.v(x).flatten(2)  # (B, c/2, HW)
        attn = torch.softmax(q @ k, dim=-1)  # (B, HW, HW)
        out = (v @ attn.transpose(1, 2)).view(b, -1, h, w)
        return x + self.gamma * self.o(out)


class _GBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int | None):
        super().__init__()
        self.bn1 = layers.batch_norm(cin, 2, num_classes, "batchnorm")
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.bn2 = layers.batch_norm(cout, 2, num_classes, "batchnorm")
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1)

    def _bn(self, bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return bn(x, y) if isinstance(bn, layers.ConditionalBatchNorm) else bn(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self._bn(self.bn1, x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self._bn(self.bn2, self.conv1(h), y)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    def __init__(
        self,
        z_dim: int,
        base: int,
        shape: tuple[int, int, int],
        num_classes: int | None = None,
        attention: int | None = None,
    ):
        super().__init__()
        self.z_dim, self.shape = z_dim, shape
        n = layers.levels(shape)
        self.side, self.c0 = 4 * 2**n, _width(base, n)
        self.fc = nn.Linear(z_dim, self.c0 * 16)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        for i in range(n):  # level n (4x4) up to level 0 (the image)
            self.blocks.append(_GBlock(_width(base, n - i), _width(base, n - i - 1), num_classes))
            if attention == 8 * 2**i:
                self.attn[str(i)] = SelfAttention(_width(base, n - i - 1))
        self.out_bn = nn.BatchNorm2d(base)
        self.out = nn.Conv2d(base, shape[0], 3, 1, 1)
        self.needs_label = bool(num_classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert y is not None or not self.needs_label, "a conditional generator needs labels y"
        # the batch size from z, not -1: ONNX then knows the channels of the first (conditional) batch norm
        h = self.fc(z).view(z.shape[0], self.c0, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        x = torch.tanh(self.out(F.relu(self.out_bn(h))))
        return layers.centre_crop(x, self.side, self.shape)


class _DBlock(nn.Module):
    def __init__(self, cin: int, cout: int, sn, norm: str, act: str, first: bool):
        super().__init__()
        self.first = first
        self.conv1, self.conv2 = sn(nn.Conv2d(cin, cout, 3, 1, 1)), sn(nn.Conv2d(cout, cout, 3, 1, 1))
        self.norm = nn.Sequential(*([] if first else layers.conv_norm(norm, cout)))
        self.act = layers.ACTIVATIONS[act]()
        self.skip = sn(nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else self.act(x)
        h = self.conv2(self.act(self.norm(self.conv1(h))))
        h = F.avg_pool2d(h, 2)
        # the optimised first block pools before its shortcut conv; the others after
        skip = self.skip(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.skip(x), 2)
        return h + skip


class ResNetDiscriminator(nn.Module):
    """Images (B, C, H, W), B divisible by pack -> scores (B // pack,). Packs stack on channels."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        base: int,
        norm: str,
        act: str,
        pack: int = 1,
        num_classes: int | None = None,
        attention: int | None = None,
    ):
        super().__init__()
        self.pack, self.shape = pack, shape
        n = layers.levels(shape)
        self.side = 4 * 2**n
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        cin = shape[0] * pack
        for i in range(n):  # the image (side 4 * 2**n) down to 4x4
            if attention == self.side // 2**i:
                self.attn[str(i)] = SelfAttention(cin, sn)
            self.blocks.append(_DBlock(cin, _width(base, i), sn, norm, act, first=i == 0))
            cin = _width(base, i)
        self.act = layers.ACTIVATIONS[act]()
        self.head = sn(nn.Linear(cin, 1))
        self.project = layers.Projection(cin, num_classes, sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c, h, w = self.shape
        x = x.reshape(x.shape[0] // self.pack, c * self.pack, h, w)
        x = layers.pad_to_side(x, self.side)
        for i, block in enumerate(self.blocks):
            if str(i) in self.attn:
                x = self.attn[str(i)](x)
            x = block(x)
        feat = self.act(x).sum((2, 3))
        return self.project(feat, self.head(feat).squeeze(1), y)


def _generator(spec: dict[str, Any]) -> nn.Module:
    return ResNetGenerator(
        spec["z_dim"], spec["hidden"], tuple(spec["sample_shape"]), spec.get("num_classes"), spec.get("attention")
    )


def _discriminator(model, shape, num_classes):
    return ResNetDiscriminator(
        shape, model.d_width, model.d_norm, model.d_activation, model.pack, num_classes, model.attention
    )


ARCH = layers.Arch("images", _generator, _discriminator, layers.image_sides(MIN_SIDE, MAX_SIDE))
