"""`shapes`: a known-answer RGB image set, drawn procedurally at any `data.resolution`.

Each image shows one shape (circle, square, triangle) in one colour (red, green, blue, yellow) on a
dark, noisy background, at a random position, size and rotation. Its class is shape x colour (12
classes), so mode coverage at real resolution is measured exactly: class modes, class KL and
per-class recall in the features stage's classifier. Everything is drawn from `seed` alone: the
same seed gives the same images, byte for byte. `data.channels: 1` draws the colours as distinct
grey levels (the same 12 classes). `data.n_samples` sets how many images are drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.datasets import Dataset, register

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
GREYS = (0.45, 0.6, 0.75, 0.9)  # the colours' stand-ins at data.channels 1: distinct, all above the background
NUM_CLASSES = len(SHAPES) * len(COLOURS)
DEFAULT_RESOLUTION = 32
_CHUNK = 1024  # images drawn at a time: bounded memory at any resolution


def class_name(k: int) -> str:
    return f"{list(COLOURS)[k % len(COLOURS)]} {SHAPES[k // len(COLOURS)]}"


def draw(
    n: int, side: int, seed: int, channels: int = 3, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, channels, side, side) uint8 (into `out` when given) and their classes (n,)
    int64: shape * 4 + colour."""
    rng = np.random.default_rng(seed)
    y = rng.integers(NUM_CLASSES, size=n)
    radius = rng.uniform(0.2, 0.34, n) * side  # circumradius; the whole shape stays inside the image
    cx = rng.uniform(radius, side - radius)
    cy = rng.uniform(radius, side - radius)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    background = rng.uniform(0.05, 0.25, n)
    palette = np.array(list(COLOURS.values())) if channels == 3 else np.array(GREYS)[:, None]
    grid = np.arange(side, dtype=np.float32) + 0.5
    out = np.empty((n, channels, side, side), np.uint8) if out is None else out
    for lo in range(0, n, _CHUNK):
        s = slice(lo, min(n, lo + _CHUNK))
        dx = grid[None, None, :] - cx[s, None, None].astype(np.float32)
        dy = grid[None, :, None] - cy[s, None, None].astype(np.float32)
        cos, sin = np.cos(angle[s])[:, None, None], np.sin(angle[s])[:, None, None]
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        r = radius[s, None, None]
        sd = _signed_distance(y[s] // len(COLOURS), u, v, r)
        mask = np.clip(sd + 0.5, 0.0, 1.0)[:, None]  # one pixel of anti-aliasing
        colour = palette[y[s] % len(COLOURS)][:, :, None, None]
        bg = background[s, None, None, None]
        img = bg * (1 - mask) + colour * mask + rng.normal(0.0, 0.03, (s.stop - s.start, channels, side, side))
        out[s] = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return out, y.astype(np.int64)


def _signed_distance(kind: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pixels' signed distance (positive inside) to each image's shape, in the shape's own frame."""
    circle = r - np.sqrt(u**2 + v**2)
    half = r / np.sqrt(2)  # a square inscribed in the circle
    square = np.minimum(half - np.abs(u), half - np.abs(v))
    phis = np.pi / 2 + 2 * np.pi * np.arange(3) / 3  # an equilateral triangle: three edges at inradius r / 2
    triangle = np.min([r / 2 - (u * np.cos(p) + v * np.sin(p)) for p in phis], axis=0)
    pick = kind[:, None, None]
    return np.where(pick == 0, circle, np.where(pick == 1, square, triangle))


def load(cfg, seed: int, fetch=None, scratch=None):
    """uint8 images (0..255: the prepared store keeps them so), their classes and the classes' names."""
    side, channels = cfg.resolution or DEFAULT_RESOLUTION, cfg.channels or 3
    out = None
    if scratch is not None:  # drawn straight to disk: memory does not grow with data.n_samples
        shape = (cfg.n_samples, channels, side, side)
        out = np.lib.format.open_memmap(Path(scratch) / "decoded.npy", "w+", np.uint8, shape)
    x, y = draw(cfg.n_samples, side, seed, channels, out)
    # the manifest (and the model card of a conditional model) says what each class id means
    return x, y, {"class_names": [class_name(k) for k in range(NUM_CLASSES)]}


register(Dataset("shapes", kind="images", labels="classes", load=load))
