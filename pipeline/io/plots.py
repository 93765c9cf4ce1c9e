"""Pictures for people: sample scatter over the true modes, image grids, loss curves (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_2d(samples: np.ndarray, real: np.ndarray, centers: np.ndarray | None, path: Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(real[:, 0], real[:, 1], s=2, c="tab:blue", alpha=0.3, label="real")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:orange", alpha=0.5, label="generated")
    if centers is not None:
        ax.scatter(centers[:, 0], centers[:, 1], marker="x", c="k", s=30, label="modes")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(images: np.ndarray, path: Path, nrow: int = 8, max_rows: int | None = None) -> None:
    """images (N, C, H, W) in [-1, 1] -> one PNG grid of `nrow` columns, N clipped to nrow * max_rows
    (max_rows defaults to nrow: a square)."""
    from PIL import Image

    x = images[: nrow * (max_rows or nrow)]
    n, c, h, w = x.shape
    rows = int(np.ceil(n / nrow))
    grid = np.ones((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = x[i]
    img = ((np.clip(grid, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    img = img[0] if c == 1 else img.transpose(1, 2, 0)
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)


def curves(history: list[dict[str, float]], keys: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history]
    for k in keys:
        if any(k in h for h in history):
            ax.plot(steps, [h.get(k, np.nan) for h in history], label=k)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scatter_metric(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    """One panel per numeric hyperparameter: the trials' final `metric` against its value."""
    plt = _plt()
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in rows)] or keys[:1]
    fig, axes = plt.subplots(1, len(numeric), figsize=(4 * len(numeric), 3.2), dpi=100, squeeze=False)
    colours = {"finished": "tab:blue", "stopped_early": "tab:orange", "failed": "tab:red"}
    for ax, k in zip(axes[0], numeric):
        for status, c in colours.items():
            pts = [(r[k], r[metric]) for r in rows if r["status"] == status and isinstance(r.get(metric), (int, float))]
            if pts and all(isinstance(p[0], (int, float)) for p in pts):
                ax.scatter(*zip(*pts), c=c, s=18, label=status)
        if all(isinstance(r.get(k), (int, float)) and r[k] > 0 for r in rows) and k.split(".")[-1].startswith("lr"):
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
    if axes[0][0].get_legend_handles_labels()[0]:  # (a first key of choices has no points to label)
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metric_panels(rows: list[dict[str, float]], path: Path) -> None:
    """One small panel per metric over training steps (they live on different scales)."""
    plt = _plt()
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "step"]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3 * max(len(keys), 1), 2.8), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), marker=".")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def nearest_neighbours(
    fake: np.ndarray, real: np.ndarray, fake_f: np.ndarray, real_f: np.ndarray, path: Path, n: int = 8, k: int = 5
) -> np.ndarray:
    """A grid whose rows are a generated image followed by its k nearest training images in feature
    space: copies of the training set (memorisation) show up as near-identical rows. Returns the
    indices (n, k) of the neighbours."""
    d = ((fake_f[:n, None, :] - real_f[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1)[:, :k]
    from pipeline.core.data import to_unit

    rows = [np.concatenate([fake[i : i + 1], to_unit(real[idx[i]])]) for i in range(min(n, len(fake)))]
    image_grid(np.concatenate(rows), path, nrow=k + 1, max_rows=len(rows))
    return idx
