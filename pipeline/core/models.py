"""Generators and discriminators: an MLP pair for 2D points, a DCGAN pair for 8x8..128x128 images
and (from pipeline.core.resnet) residual GANs for 16..256 pixels, gathered in the `ARCHS` registry.
CycleGAN's pair lives in pipeline.core.cyclegan; pipeline.core.objectives builds either family.

Pure torch: no I/O. A generator is fully described by its `spec` (a small dict saved inside every
checkpoint), so evaluation and export rebuild it without the training config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.core import resnet
from pipeline.core.layers import (  # noqa: F401  (NORMS, Arch, Norm: the registries' home is here for callers)
    ACTIVATIONS,
    NORMS,
    Arch,
    Norm,
    Projection,
    apply_layers,
    batch_norm,
    centre_crop,
    conv_norm,
    image_sides,
    levels,
    pad_to_side,
)

if TYPE_CHECKING:  # the config asks this module's registries (ARCHS, NORMS); no import cycle at run time
    from pipeline.core.config import ModelConfig


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
    return ARCHS[spec["arch"]].generator(spec)


def build_discriminator(
    model: ModelConfig, sample_shape: list[int] | tuple[int, ...], num_classes: int | None = None
) -> nn.Module:
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
        self.project = Projection(dims[-1], num_classes, sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.net(x.reshape(x.shape[0] // self.pack, -1))
        return self.project(h, self.head(h).squeeze(1), y)


# ---- DCGAN (images) -------------------------------------------------------------------------


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
        n = levels(shape)
        ch = [base * 2 ** (n - 1 - i) for i in range(n)] + [shape[0]]
        self.fc = nn.Sequential(
            nn.Linear(self.cond.width, ch[0] * 16), batch_norm(ch[0] * 16, 1, num_classes, conditioning), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks.append(nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=i == n - 1))
            blocks += [nn.Tanh()] if i == n - 1 else [batch_norm(ch[i + 1], 2, num_classes, conditioning), nn.ReLU()]
        self.net = nn.Sequential(*blocks)
        self.c0, self.side = ch[0], 4 * 2**n
        self.needs_label = bool(num_classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert y is not None or not self.needs_label, "a conditional generator needs labels y"
        h = apply_layers(self.fc, self.cond(z, y), y)
        x = apply_layers(self.net, h.view(-1, self.c0, 4, 4), y)
        return centre_crop(x, self.side, self.shape)


class DCGANDiscriminator(nn.Module):
    """Images (B, C, H, W), B divisible by pack -> scores (B // pack,). Packs stack on channels."""

    def __init__(
        self, shape: tuple[int, int, int], base: int, norm: str, act: str, pack: int = 1, num_classes: int | None = None
    ):
        super().__init__()
        self.pack, self.shape = pack, shape
        n = levels(shape)
        self.side = 4 * 2**n
        ch = [shape[0] * pack] + [base * 2**i for i in range(n)]
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks.append(sn(nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1)))
            if i > 0:
                blocks += conv_norm(norm, ch[i + 1])
            blocks.append(ACTIVATIONS[act]())
        self.net = nn.Sequential(*blocks)
        self.head = sn(nn.Linear(ch[-1] * 16, 1))
        self.project = Projection(ch[-1] * 16, num_classes, sn)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c, h, w = self.shape
        x = x.reshape(x.shape[0] // self.pack, c * self.pack, h, w)
        x = pad_to_side(x, self.side)
        h = self.net(x).flatten(1)
        return self.project(h, self.head(h).squeeze(1), y)


# ---- the architectures ----------------------------------------------------------------------

ARCHS: dict[str, Arch] = {
    "mlp": Arch(
        "points",
        lambda s: MLPGenerator(s["z_dim"], s["hidden"], s["layers"], s["sample_shape"][0], s.get("num_classes")),
        lambda m, shape, k: MLPDiscriminator(shape[0], m.d_width, m.layers, m.d_norm, m.d_activation, m.pack, k),
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
        lambda m, shape, k: DCGANDiscriminator(shape, m.d_width, m.d_norm, m.d_activation, m.pack, k),
        image_sides(8, 128),
    ),
    "resnet": resnet.ARCH,
}


def register_arch(name: str, arch: Arch) -> Arch:
    """Add an architecture at run time (a plugin's module calls this; built-in ones are listed above)."""
    ARCHS[name] = arch
    return arch
