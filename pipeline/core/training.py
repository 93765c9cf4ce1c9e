"""The training loop, free of Ray and MLflow: they plug in through `Hooks`; the model family's own
step comes from its objective (pipeline.core.objectives), so the loop knows no family and no loss by name.

Randomness is a pure function of (seed, step, phase): every step draws the *global* batch
(data indices, latents, interpolation weights) from a generator seeded by those, and each worker
takes its own slice. So N workers with batch B each see exactly what 1 worker with batch N*B sees,
and a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline.core.augment import ada_adjust
from pipeline.core.config import Config
from pipeline.core.losses import LOSSES
from pipeline.core.models import ARCHS
from pipeline.core.monitor import Monitor, Thresholds
from pipeline.core.objectives import objective

# the step's pieces, for the callers that build a GAN and its batches around this loop
from pipeline.core.steps import GAN, Batches, GradSync, Shard, autocast, d_step, label_args, no_sync, place_data  # noqa: F401


class Diverged(RuntimeError):
    """The stability monitor found the run diverged and train.on_divergence did not (or could no longer)
    roll it back; the message names the step and the evidence."""


class NonFiniteLoss(Diverged):
    """A loss became NaN or inf; the message names the step and the loss."""


def build_gan(
    cfg: Config, sample_shape: list[int], device: torch.device | str = "cpu", num_classes: int | None = None
) -> GAN:
    """G, D, EMA, optimizers and the objective's own state (model.family); `num_classes` is required
    when model.conditional is on.

    For model.family cyclegan, G is the generator pair (`G.xy`, `G.yx`) and D the discriminator
    pair (`D.x`, `D.y`): one optimizer per pair, as in the CycleGAN reference.
    """
    if cfg.model.conditional and not num_classes:
        raise ValueError("model.conditional: needs labelled data (a dataset with classes, or an npz with 'y')")
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    obj = objective(cfg.model.family)
    spec = obj.generator_spec(cfg.model, sample_shape, num_classes)
    G = obj.generator(spec).to(device)
    D = obj.discriminator(cfg.model, tuple(sample_shape), num_classes).to(device)
    t = cfg.train
    if t.channels_last and ARCHS[cfg.model.arch].kind == "images":
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if t.ema > 0 else None
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=t.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=t.betas)
    gan = GAN(G, D, G_ema, opt_g, opt_d, spec, pools=obj.state(t), monitor=new_monitor(cfg))
    if t.precision == "fp16":
        if torch.device(device).type != "cuda":
            raise ValueError("train.precision: fp16 needs a GPU; use bf16 on CPU")
        gan.scaler_d, gan.scaler_g = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    return gan


def new_monitor(cfg: Config) -> Monitor:
    """The stability monitor for `cfg`: r_t's target is ADA's; Wasserstein critics have no threshold."""
    return Monitor(LOSSES[cfg.loss.name].decision is not None, Thresholds(overfit_target=cfg.train.ada.target))


def diagnosis(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    """The stability monitor's report (monitor.Monitor.report) from a saved GAN state."""
    mon = new_monitor(cfg)
    mon.load_state_dict(state.get("monitor") or {})
    return mon.report()


def configure_numerics(deterministic: bool, device: torch.device | str) -> dict[str, Any]:
    """Set PyTorch's process-wide numerics for training on `device`; returns the flags in effect.

    On CPU nothing is set: with one torch thread per CPU a worker holds, CPU runs repeat bit for bit.
    On CUDA, `deterministic` (train.deterministic) asks for deterministic algorithms (a warning names
    any op that has none), deterministic cuDNN without autotuning, IEEE float32 for matmuls and
    convolutions (no TF32: about 1e-3 relative drift per op) and cuBLAS's fixed workspace; a rerun on
    the same GPU model, driver and library versions then repeats the same numbers. Without it, cuDNN
    autotunes and TF32 is on for matmuls and convolutions: faster, and reruns differ in the last bits,
    which GAN training amplifies to seed-to-seed differences.
    """
    if torch.device(device).type != "cuda":
        return {"deterministic": deterministic, "device": "cpu", "flags_set": False}
    import os

    precision = "ieee" if deterministic else "tf32"
    if deterministic:  # read when cuBLAS first starts in this process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    return {
        "deterministic": deterministic,
        "device": str(device),
        "flags_set": True,
        "matmul_fp32_precision": precision,
        "conv_fp32_precision": precision,
        "cudnn_benchmark": not deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def gan_state(gan: GAN) -> dict[str, Any]:
    """Everything needed to continue exactly (RNG needs none: draws are keyed by step)."""
    return {
        "step": gan.step,
        "spec": gan.spec,
        "history": list(gan.history),
        "evals": list(gan.evals),
        "G": gan.G.state_dict(),
        "D": gan.D.state_dict(),
        "G_ema": None if gan.G_ema is None else gan.G_ema.state_dict(),
        "opt_g": gan.opt_g.state_dict(),
        "opt_d": gan.opt_d.state_dict(),
        "scaler_d": None if gan.scaler_d is None else gan.scaler_d.state_dict(),
        "scaler_g": None if gan.scaler_g is None else gan.scaler_g.state_dict(),
        "ada_p": gan.ada_p,
        "ada_acc": [float(a) for a in gan.ada_acc],
        "pools": {k: p.state_dict() for k, p in gan.pools.items()},
        "monitor": gan.monitor.state_dict(),
        "lr_scale": gan.lr_scale,
        "snapshots": list(gan.snapshots),
        "monitor_window": dict(gan.monitor_window),
    }


def load_gan_state(gan: GAN, state: dict[str, Any], cfg: Config) -> None:
    gan.G.load_state_dict(state["G"])
    gan.D.load_state_dict(state["D"])
    if gan.G_ema is not None and state.get("G_ema") is not None:
        gan.G_ema.load_state_dict(state["G_ema"])
    gan.opt_g.load_state_dict(state["opt_g"])
    gan.opt_d.load_state_dict(state["opt_d"])
    for scaler, key in ((gan.scaler_d, "scaler_d"), (gan.scaler_g, "scaler_g")):
        if scaler is not None and state.get(key):
            scaler.load_state_dict(state[key])
    # current hyperparameters win over the checkpoint's (a tuner may have changed them), times the
    # factor the run's rollbacks lowered them by
    gan.lr_scale = float(state.get("lr_scale", 1.0))
    set_learning_rates(gan, cfg)
    gan.step = int(state["step"])
    gan.ada_p, gan.ada_acc = float(state.get("ada_p", 0.0)), list(state.get("ada_acc", [0.0, 0.0]))
    gan.history = list(state.get("history", []))
    gan.evals = list(state.get("evals", []))
    for k, pool_state in state.get("pools", {}).items():
        gan.pools[k].load_state_dict(pool_state)
    if state.get("monitor"):
        gan.monitor.load_state_dict(state["monitor"])
    gan.snapshots = list(state.get("snapshots") or [])
    gan.monitor_window = dict(state.get("monitor_window") or {})


def set_learning_rates(gan: GAN, cfg: Config) -> None:
    """params' learning rates and betas on both optimizers, for the step `gan.step`: times `gan.lr_scale`
    (the rollbacks) and `lr_factor` (train.lr_decay's schedule)."""
    scale = gan.lr_scale * lr_factor(cfg.train.lr_decay, gan.step, cfg.train.steps)
    for opt, lr in ((gan.opt_g, cfg.train.lr_g), (gan.opt_d, cfg.train.lr_d)):
        for group in opt.param_groups:
            group["lr"], group["betas"] = lr * scale, cfg.train.betas


def lr_factor(decay: float, step: int, steps: int) -> float:
    """The learning rates' schedule: 1 at step 0, falling linearly to 1 - decay at step `steps`. A function
    of the step alone, so a resumed or rolled-back run follows it exactly as an uninterrupted one."""
    return 1.0 - decay * min(step, steps) / steps


@dataclass
class Hooks:
    """What the loop calls out to. Defaults do nothing (a bare loop, as in the benchmark)."""

    sync_grads: GradSync = no_sync  # average .grad across workers
    on_event: Callable[[GAN, dict[str, Any]], None] = lambda gan, event: None  # a stability verdict or a rollback
    on_log: Callable[[int, dict[str, float]], None] = lambda step, stats: None
    on_checkpoint: Callable[[GAN, bool], None] = lambda gan, final: None
    on_eval: Callable[[GAN], dict[str, float]] = lambda gan: {}  # in-training metrics ({} = none)
    reduce_stats: Callable[[dict[str, float]], dict[str, float]] = lambda s: s


def _ada_tick(gan: GAN, cfg: Config, stats: dict[str, torch.Tensor], reduce: Callable) -> None:
    """Accumulate r_t; every `interval` steps move p from the workers' mean r_t."""
    ada, r_t = cfg.train.ada, stats["ada/r_t"]
    # summed in float64 on r_t's device: the host reads it once per interval, not at every step
    gan.ada_acc[0] = gan.ada_acc[0] + r_t.double()
    gan.ada_acc[1] += 1
    if gan.step % ada.interval == 0:
        mean = reduce({"ada/r_t": float(gan.ada_acc[0]) / gan.ada_acc[1]})["ada/r_t"]
        p = ada_adjust(gan.ada_p, mean, ada.target, cfg.train.batch_size, ada.interval, ada.speed_img)
        gan.ada_p = min(p, ada.p_max)
        gan.ada_acc = [0.0, 0.0]
    stats["ada/p"] = torch.full((), gan.ada_p, device=r_t.device)


class _Sums:
    """Step statistics summed on the device, copied to the host (one copy for all of them) at every
    tick, where they add to two windows: the log's (train.log_every) and the monitor's
    (train.monitor_every). Each window keeps a sum and a count per statistic (the monitor's signals are
    measured on every PROBE_EVERY-th step only) and its number of steps, so its means do not depend
    on the other window's cadence."""

    def __init__(self, monitor: dict[str, Any] | None = None) -> None:
        """`monitor`: the monitor's open window as `window` gave it (a resumed run's)."""
        self.device: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.n = 0
        m = monitor or {}
        self.windows: dict[str, tuple[dict[str, float], dict[str, int], int]] = {
            "log": ({}, {}, 0),
            "monitor": (dict(m.get("sums", {})), dict(m.get("counts", {})), int(m.get("steps", 0))),
        }

    def window(self, name: str) -> dict[str, Any]:
        """A copy of the window's sums, counts and steps (plain data, for a checkpoint)."""
        sums, counts, steps = self.windows[name]
        return {"sums": dict(sums), "counts": dict(counts), "steps": steps}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, v in stats.items():
            self.device[name] = self.device.get(name, 0.0) + v
            self.counts[name] = self.counts.get(name, 0) + 1
        self.n += 1

    def drain(self) -> None:
        if not self.n:
            return
        values = torch.stack([v.double() for v in self.device.values()]).tolist()
        for name, (sums, counts, steps) in self.windows.items():
            for k, v in zip(self.device, values):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + self.counts[k]
            self.windows[name] = (sums, counts, steps + self.n)
        self.device, self.counts, self.n = {}, {}, 0

    def finite(self, window: str) -> bool:
        return all(math.isfinite(v) for v in self.windows[window][0].values())

    def take(self, window: str) -> tuple[dict[str, float], int]:
        """The window's means and its step count; the window starts again."""
        sums, counts, steps = self.windows[window]
        self.windows[window] = ({}, {}, 0)
        return {k: v / counts[k] for k, v in sums.items()}, steps


def _check_finite(step: int, values: dict[str, Any], why: str = "") -> None:
    """Raise NonFiniteLoss naming the step and the first non-finite value (a loss first)."""
    bad = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        first = next((k for k in bad if k.startswith("loss/")), bad[0])
        reason = f"{why}; " if why else ""
        raise NonFiniteLoss(f"step {step}: {first} is {values[first]}; stopping ({reason}last good checkpoint kept)")


def train(gan: GAN, cfg: Config, batches: Batches, hooks: Hooks = Hooks()) -> GAN:
    """Run generator steps from `gan.step` to `cfg.train.steps`, calling the hooks.

    Step statistics stay on the device and reach the host at each tick: every `train.monitor_every`
    steps (the stability monitor judges the run, see `_judge`), every `log_every` steps (`on_log`)
    and at every checkpoint. A NaN or inf is caught at the first tick after it, so it never reaches a
    checkpoint (checking every step would force a sync on GPUs): at the monitor's tick, which every
    worker reaches together, the monitor may roll the run back; at a log or checkpoint tick between
    two of its ticks, the run stops there.
    """
    t, step_fn = cfg.train, objective(cfg.model.family).step
    sums, tick = _Sums(gan.monitor_window), time.perf_counter()
    gan.G.train()
    gan.D.train()
    while gan.step < t.steps:
        step = gan.step
        if t.lr_decay:  # the schedule's rates for this step (train.lr_decay)
            set_learning_rates(gan, cfg)
        batches.begin(step)
        stats = step_fn(gan, cfg, batches, step, hooks.sync_grads)
        gan.step = step + 1
        if cfg.train.ada.enabled:
            _ada_tick(gan, cfg, stats, hooks.reduce_stats)
        sums.add(stats)
        last = gan.step == t.steps
        logs = gan.step % t.log_every == 0 or last
        saves = gan.step % t.checkpoint_every == 0 or last
        judges = gan.step % t.monitor_every == 0 or last
        evaluates = bool(cfg.eval.every) and (gan.step % cfg.eval.every == 0 or last)
        if not (logs or saves or judges or evaluates):
            continue
        sums.drain()
        if evaluates:
            row = hooks.on_eval(gan)
            if row:
                gan.evals.append({"step": gan.step, **row})
        if not judges and not sums.finite("monitor"):
            # between the monitor's ticks (a log or checkpoint tick): stop here, on this worker, so the
            # value never reaches a checkpoint; the monitor's tick, which every worker reaches together,
            # is where a rollback can happen
            _check_finite(gan.step, sums.windows["monitor"][0])
        if judges:
            means, _ = sums.take("monitor")
            if _judge(gan, cfg, batches, means, hooks):  # rolled back: the windows start again
                sums, tick = _Sums(), time.perf_counter()
                continue
        if logs:
            means, count = sums.take("log")
            now = time.perf_counter()
            means["time/step_s"] = (now - tick) / count
            means = hooks.reduce_stats(means)
            # the monitor's own signals as of its last tick, logged beside the step statistics
            means.update({k: v for k, v in gan.monitor.last.items() if k in TICK_SIGNALS})
            gan.history.append({"step": gan.step, **means})
            hooks.on_log(gan.step, means)
            tick = now
        if saves:
            gan.monitor_window = sums.window("monitor")  # a resumed run closes this window as this one would
            hooks.on_checkpoint(gan, last)
    return gan


def _judge(gan: GAN, cfg: Config, batches: Batches, means: dict[str, float], hooks: Hooks) -> bool:
    """The stability monitor's tick: judge the window's means (reduced across workers, so every worker
    decides alike) and act on a `diverged` verdict as train.on_divergence says. Returns True when
    the run rolled back to its last healthy state."""
    t = cfg.train
    signals = {**hooks.reduce_stats(means), **tick_signals(gan, cfg, batches)}
    fresh = gan.evals[-1] if gan.evals and gan.evals[-1]["step"] == gan.step else None
    events = gan.monitor.observe(gan.step, signals, fresh)
    for event in events:
        hooks.on_event(gan, event)
    diverged = next((e for e in events if e["kind"] == "diverged"), None)
    # a NaN or inf is acted on at every tick, recorded already or not: nothing trains on from it
    bad = [k for k, v in signals.items() if not math.isfinite(v)]
    if diverged is None and not bad:
        if t.on_divergence == "rollback" and not gan.monitor.streaks.get("diverged"):
            gan.snapshots = (gan.snapshots + [_snapshot(gan)])[-2:]
        return False
    if t.on_divergence == "warn" and not bad:
        return False
    rollbacks = sum(e["kind"] == "rollback" for e in gan.monitor.events)
    if t.on_divergence == "rollback" and gan.snapshots and rollbacks < t.max_rollbacks:
        _rollback(gan, cfg, hooks)
        return True
    why = f"train.on_divergence: {t.on_divergence}"
    if t.on_divergence == "rollback":
        why = (
            f"after {rollbacks} rollback(s) (train.max_rollbacks {t.max_rollbacks})"
            if rollbacks >= t.max_rollbacks
            else "no healthy state to roll back to yet"
        )
    if bad:
        _check_finite(gan.step, signals, why)
    evidence = ", ".join(
        f"{k}={v:.4g}" for k, v in (diverged or {}).get("evidence", {}).items() if isinstance(v, float)
    )
    raise Diverged(f"step {gan.step}: the run diverged ({evidence}); stopping ({why}; last good checkpoint kept)")


def _snapshot(gan: GAN) -> dict[str, Any]:
    """A host copy of everything the run continues from (weights, optimizers, ADA, pools, step)."""
    skip = ("history", "evals", "monitor", "monitor_window", "snapshots")
    state = {k: v for k, v in gan_state(gan).items() if k not in skip}
    return _host_copy(state)


def _host_copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _host_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_host_copy(v) for v in x)
    return copy.deepcopy(x)


def _rollback(gan: GAN, cfg: Config, hooks: Hooks) -> None:
    """Back to the older of the last two healthy snapshots, both learning rates times
    train.rollback_lr_factor. The draws are keyed by step, so the same seed and the same events give
    the same weights."""
    snap, at, scale = gan.snapshots[0], gan.step, gan.lr_scale
    keep = {"history": gan.history, "evals": gan.evals, "monitor": gan.monitor.state_dict()}
    # a copy: the optimizers would otherwise step the snapshot's own tensors
    load_gan_state(gan, {**_host_copy(snap), **keep, "snapshots": gan.snapshots[:1]}, cfg)
    gan.lr_scale = scale * cfg.train.rollback_lr_factor  # compounds over rollbacks to the same state
    set_learning_rates(gan, cfg)
    # the record starts again where the run did: no step twice in history.csv and evals.csv
    gan.history = [row for row in gan.history if row["step"] <= gan.step]
    gan.evals = [row for row in gan.evals if row["step"] <= gan.step]
    lrs = {"lr_g": gan.opt_g.param_groups[0]["lr"], "lr_d": gan.opt_d.param_groups[0]["lr"]}
    hooks.on_event(gan, gan.monitor.rolled_back(at, gan.step, lrs))


TICK_SIGNALS = ("weights/G", "weights/D", "ema/distance", "D/r_train", "D/r_heldout")  # see tick_signals
HELDOUT_ROWS = 256  # reals scored at each tick, of the training set and of the held-out set


@torch.no_grad()
def tick_signals(gan: GAN, cfg: Config, batches: Batches) -> dict[str, float]:
    """The monitor's own signals, read at its tick from the state every worker shares: the weights'
    norms, the EMA's distance from the raw generator, and r_t = E[sign(D(x) - decision)] on fixed
    reals D trains on and on held-out reals (D in eval mode for both: no batch statistics move)."""
    out = {"weights/G": float(_norm(gan.G.parameters())), "weights/D": float(_norm(gan.D.parameters()))}
    if gan.G_ema is not None:
        out["ema/distance"] = ema_distance(gan.G_ema, gan.G)
    decision = LOSSES[cfg.loss.name].decision
    if batches.heldout is None or decision is None or not objective(cfg.model.family).labels:
        return out
    n = min(HELDOUT_ROWS, len(batches.x), len(batches.heldout))
    n -= n % cfg.model.pack
    if n == 0 or (batches.num_classes and (batches.y is None or batches.heldout_y is None)):
        return out
    sets = [(batches.x, batches.y), (batches.heldout, batches.heldout_y)]
    was_training = gan.D.training
    gan.D.eval()
    with autocast(cfg, batches.device):
        scores = [
            gan.D(batches.first(x, n), *label_args(batches.first(y, n) if batches.num_classes else None)).float()
            for x, y in sets
        ]
    gan.D.train(was_training)
    r_train, r_heldout = (float(torch.sign(sc - decision).mean()) for sc in scores)
    return {**out, "D/r_train": r_train, "D/r_heldout": r_heldout}


def _norm(params) -> torch.Tensor:
    return torch.nn.utils.get_total_norm([p.detach() for p in params])


@torch.no_grad()
def ema_distance(ema: torch.nn.Module, model: torch.nn.Module) -> float:
    """||theta_ema - theta|| / ||theta|| over the generator's parameters."""
    params = list(model.parameters())
    diff = torch.nn.utils.get_total_norm([e - p for e, p in zip(ema.parameters(), params)])
    return float(diff / torch.nn.utils.get_total_norm(params).clamp_min(1e-12))


def sample(
    G: torch.nn.Module, n: int, z_dim: int, seed: int, batch: int = 1024, num_classes: int | None = None
) -> np.ndarray:
    """n samples from G (eval mode) with latents drawn from N(0, I) under `seed`.

    Conditional generators get balanced labels `arange(n) % num_classes` (see `sample_labels`).
    """
    g = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    z = torch.randn(n, z_dim, generator=g).to(device)
    y = sample_labels(n, num_classes)
    y = None if y is None else y.to(device)
    was_training = G.training
    G.eval()
    with torch.no_grad():
        out = torch.cat(
            [G(z[i : i + batch], *label_args(None if y is None else y[i : i + batch])) for i in range(0, n, batch)]
        )
    G.train(was_training)
    return out.float().cpu().numpy()


def sample_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    return None if not num_classes else torch.arange(n) % num_classes
