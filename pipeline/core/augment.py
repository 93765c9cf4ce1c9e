"""Discriminator augmentation: adaptive (ADA, Karras et al. 2020) and DiffAugment (Zhao et al. 2020),
`train.augment: ada | diffaugment`. Pure torch: no I/O.

`augment` is what D sees: apply it, with the same p, to reals and to fakes alike (asymmetric
augmentation would bias D). It is differentiable with respect to its input, so G's gradient flows
through it, and deterministic given the `torch.Generator`: every call draws the same amount of
randomness for the same input shape, whatever p is. `ada_adjust` moves p from the overfitting
signal `overfit_signal` (StyleGAN2-ADA's r_t heuristic).

Unlike StyleGAN2-ADA, an applied augmentation is never the identity (a flip always flips, a
rotation is by 90, 180 or 270 degrees, a shift is never (0, 0)), so "applied" means "changed". The
identity stays the most likely outcome, which keeps the augmentations from leaking into G, only
while p stays below about 0.75 (a rotation's identity has probability 1 - p, each other angle p/3).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch

IMAGE_OPS = ("flip", "translate", "rot90", "brightness", "contrast", "saturation", "cutout")
POINT_OPS = ("rotate", "jitter")

BRIGHTNESS_STD = 0.2  # added to every pixel; images are in [-1, 1] (StyleGAN2-ADA's value)
CONTRAST_STD = 0.5  # log2 of the factor multiplying every pixel (about 0, i.e. mid-grey)
SATURATION_STD = 1.0  # log2 of the factor scaling each pixel's distance to its channel mean
ROTATE_STD = math.radians(5.0)  # points: rotation about the origin (the 2D mixtures are centred)
JITTER_STD = 0.01  # points: Gaussian noise in data units (the ring's mode std; a fifth of the grid's)


class Draws:
    """Random draws for one worker's slice of a global batch.

    Every draw is made for all `world * n` samples of the global batch and sliced to rows
    [rank * n, (rank + 1) * n), so N workers augment exactly as one worker with the whole batch.
    `source` is a `torch.Generator` or a `pipeline.core.draws.Stream` (the same values, staged on the
    training device in one copy per step).
    """

    def __init__(self, source: Any, rank: int = 0, world: int = 1):
        self.src = _GeneratorSource(source) if isinstance(source, torch.Generator) else source
        self.rank, self.world = rank, world

    def _rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.rank * n : (self.rank + 1) * n]

    def rand(self, n: int, *rest: int) -> torch.Tensor:
        return self._rows(self.src.rand(n * self.world, *rest), n)

    def randn(self, n: int, *rest: int) -> torch.Tensor:
        return self._rows(self.src.randn(n * self.world, *rest), n)

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return self._rows(self.src.randint(low, high, (n * self.world,)), n)


class _GeneratorSource:
    """A torch.Generator with the `Stream` methods (draws on the generator's device)."""

    def __init__(self, g: torch.Generator):
        self.g = g

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, device=self.g.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, device=self.g.device)

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.g, device=self.g.device)


def augment(
    x: torch.Tensor,
    p: float,
    generator: Any,
    ops: Collection[str] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Augment a batch: each op is applied to each sample independently with probability p.

    x: images (N, C, H, W) in [-1, 1] or points (N, D); returns a new tensor of the same shape,
    dtype and device. `ops` picks a subset of IMAGE_OPS / POINT_OPS (default: all that apply;
    "rot90" needs H == W, "saturation" C == 3, "rotate" D == 2), always run in the order listed.
    Image ops: horizontal flip; integer translation by up to 1/8 of each side, edge-replicate
    padding (no new values at the border); rotation by a multiple of 90 degrees; brightness
    (+ N(0, 0.2^2)); contrast (x 2^N(0, 0.5^2)); saturation (distance to the channel mean
    x 2^N(0, 1)); cutout (a square half the side, centre uniform in the image, clipped at the
    border, set to 0). Point ops: rotation about the origin by N(0, (5 deg)^2); jitter
    (+ N(0, 0.01^2) per coordinate).
    p == 0 returns values equal to x, p == 1 applies every op to every sample. Randomness is drawn
    on the generator's device (a `pipeline.core.draws.Stream`: staged on the training device); the draws depend only on x's shape and `ops`, not on p.
    `shard` = (rank, world): x is this worker's slice of a global batch of world * N samples (see
    `Draws`).
    """
    assert 0.0 <= p <= 1.0, f"p must be in [0, 1], got {p}"
    if x.dim() == 4:
        table, default = _IMAGE, [op for op in IMAGE_OPS if _image_op_fits(op, x.shape)]
    elif x.dim() == 2:
        table, default = _POINT, [op for op in POINT_OPS if op != "rotate" or x.shape[1] == 2]
    else:
        raise ValueError(f"augment: expected images (N, C, H, W) or points (N, D), got shape {tuple(x.shape)}")
    chosen = default if ops is None else list(ops)
    bad = [op for op in chosen if op not in default]
    if bad:
        raise ValueError(f"augment: ops {bad} do not apply to shape {tuple(x.shape)}; allowed: {default}")
    draws = Draws(generator, *shard)
    for op in (op for op in table if op in chosen):
        x = table[op](x, _coin(x, p, draws), draws)
    return x


def ada_adjust(p: float, r_t: float, target: float, batch_size: int, interval: int, speed_img: int) -> float:
    """StyleGAN2-ADA's update, run every `interval` steps of `batch_size` images (the global batch).

    p moves by sign(r_t - target) * batch_size * interval / speed_img, clipped to [0, 1]: at full
    speed p crosses [0, 1] in `speed_img` images.
    """
    sign = (r_t > target) - (r_t < target)
    return min(1.0, max(0.0, p + sign * batch_size * interval / speed_img))


def overfit_signal(d_real_scores: torch.Tensor) -> torch.Tensor:
    """r_t = E[sign(D(x))] over raw scores on reals (logits: 0 is D = 1/2), a 0-dim tensor, no grad.

    0 means D cannot tell reals from fakes, 1 that it is sure of every real (it overfits). For
    Wasserstein critics the score's offset is arbitrary, so the signal means little there.
    """
    return torch.sign(d_real_scores.detach()).float().mean()


# ---- helpers --------------------------------------------------------------------------------


def _coin(x: torch.Tensor, p: float, g: Draws) -> torch.Tensor:
    """(N,) bool, each True with probability p; exact at p = 0 and 1 (rand is in [0, 1))."""
    return (g.rand(x.shape[0]) < p).to(x.device)


def _normal(n: int, g: Draws, like: torch.Tensor) -> torch.Tensor:
    return g.randn(n).to(device=like.device, dtype=like.dtype)


def _where(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(m.view((-1,) + (1,) * (a.dim() - 1)), a, b)


def _image_op_fits(op: str, shape: torch.Size) -> bool:
    return (op != "rot90" or shape[2] == shape[3]) and (op != "saturation" or shape[1] == 3)


# ---- image ops: (x, mask, generator) -> x ----------------------------------------------------


def _flip(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    return _where(m, x.flip(3), x)


def _translate(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    n, c, h, w = x.shape
    sh, sw = max(1, h // 8), max(1, w // 8)
    # a uniform shift among the (2sh+1)(2sw+1) - 1 non-zero ones: skip the centre index
    j = g.randint(0, (2 * sh + 1) * (2 * sw + 1) - 1, n).to(x.device)
    j = j + (j >= sh * (2 * sw + 1) + sw).long()
    dy, dx = (j // (2 * sw + 1) - sh) * m, (j % (2 * sw + 1) - sw) * m
    rows = (torch.arange(h, device=x.device) - dy[:, None]).clamp(0, h - 1)  # (n, h), edge padding
    cols = (torch.arange(w, device=x.device) - dx[:, None]).clamp(0, w - 1)
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _rot90(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    k = g.randint(1, 4, x.shape[0]).to(x.device)
    out = x
    for i in (1, 2, 3):
        out = _where(m & (k == i), torch.rot90(x, i, (2, 3)), out)
    return out


def _brightness(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    b = BRIGHTNESS_STD * _normal(x.shape[0], g, x)
    return _where(m, x + b.view(-1, 1, 1, 1), x)


def _contrast(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    c = torch.exp2(CONTRAST_STD * _normal(x.shape[0], g, x))
    return _where(m, x * c.view(-1, 1, 1, 1), x)


def _saturation(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    s = torch.exp2(SATURATION_STD * _normal(x.shape[0], g, x)).view(-1, 1, 1, 1)
    grey = x.mean(1, keepdim=True)
    return _where(m, grey + s * (x - grey), x)


def _cutout(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    n, _, h, w = x.shape
    centre = g.rand(n, 2).to(x.device)
    ys = (torch.arange(h, device=x.device) + 0.5) / h  # pixel centres in [0, 1]
    xs = (torch.arange(w, device=x.device) + 0.5) / w
    inside_y = (ys[None, :] - centre[:, :1]).abs() < 0.25  # a square half the side
    inside_x = (xs[None, :] - centre[:, 1:]).abs() < 0.25
    hole = inside_y[:, :, None] & inside_x[:, None, :] & m[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)


_IMAGE = {
    "flip": _flip,
    "translate": _translate,
    "rot90": _rot90,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturation": _saturation,
    "cutout": _cutout,
}


# ---- point ops ------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    a = ROTATE_STD * _normal(x.shape[0], g, x)
    cos, sin = torch.cos(a), torch.sin(a)
    rotated = torch.stack([cos * x[:, 0] - sin * x[:, 1], sin * x[:, 0] + cos * x[:, 1]], 1)
    return _where(m, rotated, x)


def _jitter(x: torch.Tensor, m: torch.Tensor, g: Draws) -> torch.Tensor:
    noise = JITTER_STD * g.randn(*x.shape).to(device=x.device, dtype=x.dtype)
    return _where(m, x + noise, x)


_POINT = {"rotate": _rotate, "jitter": _jitter}


# ---- DiffAugment (Zhao et al. 2020) ---------------------------------------------------------


def diffaugment(x: torch.Tensor, generator: Any, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """DiffAugment's "color,translation,cutout" policy, applied to every sample (no p).

    As in the authors' code: brightness + U(-0.5, 0.5); saturation (distance to the pixel's channel
    mean) x U(0, 2); contrast (distance to the image mean) x U(0.5, 1.5); an integer translation by
    up to 1/8 of each side, zero-padded; cutout of a square half the side, its centre uniform over
    the image, set to 0. Differentiable with respect to x, so G learns through it: apply it to reals
    and fakes, in D's and in G's steps. Deterministic given the generator (a `torch.Generator` or a
    `pipeline.core.draws.Stream`); `shard` as for `augment`.
    """
    if x.dim() != 4:
        raise ValueError(f"diffaugment: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    g = Draws(generator, *shard)
    n, _, h, w = x.shape
    u = lambda: g.rand(n).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    x = x + (u() - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (u() * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (u() + 0.5) + mean
    x = _shift_zero_padded(x, g)
    return _cutout_square(x, g)


def _shift_zero_padded(x: torch.Tensor, g: Draws) -> torch.Tensor:
    n, c, h, w = x.shape
    sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    dy = g.randint(-sh, sh + 1, n).to(x.device)
    dx = g.randint(-sw, sw + 1, n).to(x.device)
    rows = torch.arange(h, device=x.device) - dy[:, None]  # (n, h): output row i reads row i - dy
    cols = torch.arange(w, device=x.device) - dx[:, None]
    keep_r, keep_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    x = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
    x = x.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
    keep = keep_r[:, :, None] & keep_c[:, None, :]
    return x * keep[:, None].to(x.dtype)


def _cutout_square(x: torch.Tensor, g: Draws) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    oy = g.randint(0, h + (1 - ch % 2), n).to(x.device) - ch // 2  # the square's first row
    ox = g.randint(0, w + (1 - cw % 2), n).to(x.device) - cw // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys[None] >= oy[:, None]) & (ys[None] < oy[:, None] + ch)
    in_x = (xs[None] >= ox[:, None]) & (xs[None] < ox[:, None] + cw)
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x * (~hole)[:, None].to(x.dtype)
