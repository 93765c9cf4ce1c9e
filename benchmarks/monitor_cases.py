"""Labelled runs for the stability monitor: healthy ones and broken ones whose failure the theory
names, with the step it starts at. Shared by benchmarks/bench_monitor.py (the whole set) and
tests/unit/test_monitor.py (a few known answers). Runs the bare training loop (no Ray, no MLflow).

The broken runs, each from the seeds:
- the saturating minimax loss against a discriminator trained far ahead (n_critic 25, lr_d 1e-2):
  G's loss log(1 - D(G(z))) has slope D(G(z)) -> 0, `vanishing_g_gradient`;
- the Dirac GAN (data at 0, G(z) = theta, D(x) = psi * x, the Wasserstein loss: the bilinear game
  theta * psi) under plain gradient steps: simultaneous steps spiral out (each step multiplies the
  radius by sqrt(1 + lr^2)), `diverged`; alternating steps circle for ever, `oscillating`;
- a generator forced to one output (its latent multiplied by 0), from the start or from a given step,
  `mode_collapse`;
- a discriminator trained far longer than G (n_critic 10) on 64 reals, `d_overfit`;
- learning rates so large the scores overflow, `diverged` (NaN).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.core import training
from pipeline.core.config import Config, build_config, deep_merge
from pipeline.core.data import prepare

BASE: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "grid", "n_samples": 20000},
    "loss": {"r1_gamma": 0.0},  # the seeds' plain methods (the default recipe adds R1; "grid R1" sets it)
    "train": {"steps": 2000, "log_every": 1000, "checkpoint_every": 1000, "on_divergence": "warn"},
    "eval": {"every": 0},
}


@dataclass
class Case:
    name: str
    params: dict[str, Any]
    expect: str  # "healthy" or the verdict the theory names
    onset: int = 0  # the step the failure starts at
    alter: Callable[[training.GAN, Config], None] | None = None  # changes the built GAN
    dirac: bool = False  # the Dirac GAN (data, G and D of its own)
    tags: tuple[str, ...] = field(default_factory=tuple)  # "few": train on 64 reals


class Collapsed(torch.nn.Module):
    """G with its latent multiplied by 0 from step `onset` on: every fake is the same point."""

    def __init__(self, G: torch.nn.Module, onset: int, clock: list[int]):
        super().__init__()
        self.G, self.onset, self.clock = G, onset, clock

    def forward(self, z, *y):
        return self.G(z * 0 if self.clock[0] >= self.onset else z, *y)


def collapse_from(onset: int) -> Callable[[training.GAN, Config], None]:
    def alter(gan: training.GAN, cfg: Config) -> None:
        clock = [0]
        gan.G = Collapsed(gan.G, onset, clock)
        gan.clock = clock  # the runner advances it (see `run`)

    return alter


class DiracG(torch.nn.Module):
    """G(z) = theta + 0.1 z: a point mass moved by one parameter (the noise keeps a batch spread)."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.ones(1))

    def forward(self, z):
        return self.theta + 0.1 * z[:, :1]


def dirac(gan: training.GAN, cfg: Config) -> None:
    """The Dirac GAN with plain gradient steps of size train.lr_g / lr_d (Mescheder et al. 2018)."""
    gan.G, gan.D = DiracG(), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(gan.D.weight)
    gan.G_ema = DiracG().requires_grad_(False) if cfg.train.ema > 0 else None
    gan.opt_g = torch.optim.SGD(gan.G.parameters(), lr=cfg.train.lr_g)
    gan.opt_d = torch.optim.SGD(gan.D.parameters(), lr=cfg.train.lr_d)


def dirac_params(lr: float, **train: Any) -> dict[str, Any]:
    t = {"steps": 3000, "ema": 0.999, "lr_g": lr, "lr_d": lr, **train}
    return {"loss": {"name": "wgan", "clip": 1.0e6}, "model": {"z_dim": 1}, "train": t}


CASES: list[Case] = [
    # healthy: the presets and methods of the pipeline, short
    Case("grid default", {}, "healthy"),
    Case("grid default, seed 1", {"seed": 1}, "healthy"),
    Case("grid, no EMA", {"train": {"ema": 0.0}}, "healthy"),
    Case("ring", {"data": {"name": "ring"}}, "healthy"),
    Case(
        "grid wgan-gp", {"loss": {"name": "wgan-gp"}, "train": {"n_critic": 5, "lr_g": 1e-4, "lr_d": 1e-4}}, "healthy"
    ),
    Case("grid hinge", {"loss": {"name": "hinge"}}, "healthy"),
    Case("grid lsgan", {"loss": {"name": "lsgan"}}, "healthy"),
    Case("ring pacgan2", {"data": {"name": "ring"}, "model": {"pack": 2}}, "healthy"),
    Case("grid simultaneous", {"train": {"update": "simultaneous"}}, "healthy"),
    Case("grid R1", {"loss": {"r1_gamma": 0.1}, "seed": 2}, "healthy"),
    Case(
        "digits DCGAN",
        {
            "data": {"name": "digits"},
            "model": {"arch": "dcgan", "z_dim": 16, "hidden": 16},
            "train": {"batch_size": 64, "steps": 600},
        },
        "healthy",
    ),
    Case(
        "Dirac GAN, alternating, small steps, EMA off",
        dirac_params(0.001, ema=0.0),
        "healthy",
        alter=dirac,
        dirac=True,
    ),
    # broken
    Case(
        "minimax vs a strong D (grid)",
        {"loss": {"name": "minimax"}, "train": {"n_critic": 25, "lr_d": 0.01, "steps": 600}},
        "vanishing_g_gradient",
    ),
    Case(
        "minimax vs a strong D (ring)",
        {"data": {"name": "ring"}, "loss": {"name": "minimax"}, "train": {"n_critic": 25, "lr_d": 0.01, "steps": 600}},
        "vanishing_g_gradient",
    ),
    Case(
        "Dirac GAN, simultaneous",
        dirac_params(0.1, update="simultaneous"),
        "diverged",
        alter=dirac,
        dirac=True,
    ),
    Case("Dirac GAN, alternating", dirac_params(0.1), "oscillating", alter=dirac, dirac=True),
    Case("collapsed G (grid)", {}, "mode_collapse", alter=collapse_from(0)),
    Case("collapsed G (ring)", {"data": {"name": "ring"}}, "mode_collapse", alter=collapse_from(0)),
    Case("G collapses at step 1000", {}, "mode_collapse", onset=1000, alter=collapse_from(1000)),
    Case(
        "D overfits 64 digits",
        {
            "data": {"name": "digits"},
            "model": {"arch": "dcgan", "z_dim": 16, "hidden": 16},
            "train": {"batch_size": 64, "steps": 800, "n_critic": 10},
        },
        "d_overfit",
        tags=("few",),
    ),
    Case("learning rates 1e6", {"train": {"lr_g": 1.0e6, "lr_d": 1.0e6, "steps": 400}}, "diverged"),
    Case(
        "simultaneous, learning rates 1e6",
        {"train": {"lr_g": 1.0e6, "lr_d": 1.0e6, "update": "simultaneous", "steps": 400}},
        "diverged",
    ),
]


def config(case: Case) -> Config:
    return build_config(deep_merge(BASE, case.params))


def batches_for(case: Case, cfg: Config) -> training.Batches:
    if case.dirac:  # data: a point mass at 0 with a little noise
        g = torch.Generator().manual_seed(cfg.seed)
        x, heldout = 0.1 * torch.randn(4000, 1, generator=g), 0.1 * torch.randn(500, 1, generator=g)
        return training.Batches(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, heldout=heldout)
    p = prepare(cfg.data, cfg.seed)
    x, heldout = torch.from_numpy(p.x_train), torch.from_numpy(p.x_val)
    if "few" in case.tags:  # few reals: D can learn them by heart
        x = x[:64]
    return training.Batches(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, heldout=heldout)


def run(case: Case, steps: int | None = None) -> dict[str, Any]:
    """Train the case with the monitor on; its report, the step the expected verdict was first
    seen, the delay from the onset, and the time per step."""
    cfg = config(case)
    if steps is not None:
        cfg = build_config(deep_merge(cfg.to_dict(), {"train": {"steps": steps}}))
    torch.manual_seed(cfg.seed)
    batches = batches_for(case, cfg)
    gan = training.build_gan(cfg, list(batches.x.shape[1:]))
    if case.alter is not None:
        case.alter(gan, cfg)
    clock = getattr(gan, "clock", None)
    if clock is not None:  # the collapse's clock follows the training step
        begin = batches.begin

        def tick(step: int) -> None:
            clock[0] = step
            begin(step)

        batches.begin = tick
    t0 = time.perf_counter()
    error = None
    try:
        training.train(gan, cfg, batches)
    except training.Diverged as e:
        error = str(e)
    wall = time.perf_counter() - t0
    report = gan.monitor.report()
    first = next((e["step"] for e in report["events"] if e["kind"] == case.expect), None)
    return {
        "case": case.name,
        "expect": case.expect,
        "verdict": report["verdict"],
        "problems": report["problems"],
        "first_seen": first,
        "delay": None if first is None else first - case.onset,
        "steps": gan.step,
        "step_s": wall / max(gan.step, 1),
        "error": error,
        "report": report,
    }
