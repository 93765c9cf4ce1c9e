"""The GAN training loop, free of Ray and MLflow: they plug in through `Hooks`.

Randomness is a pure function of (seed, step, phase): every step draws the *global* batch
(data indices, latents, interpolation weights) from a generator seeded by those, and each worker
takes its own slice. So N workers with batch B each see exactly what 1 worker with batch N*B sees,
and a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pipeline import cyclegan
from pipeline.augment import ada_adjust, augment, diffaugment, overfit_signal
from pipeline.config import Config
from pipeline.draws import Phase, StepDraws, step_generator
from pipeline.losses import LOSSES, Terms, terms
from pipeline.models import ARCHS, generator_spec
from pipeline.monitor import Monitor, Thresholds
from pipeline.networks import build_discriminator, build_generator


class Diverged(RuntimeError):
    """The stability monitor found the run diverged and train.on_divergence did not (or could no longer)
    roll it back; the message names the step and the evidence."""


class NonFiniteLoss(Diverged):
    """A loss became NaN or inf; the message names the step and the loss."""


@dataclass
class GAN:
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    spec: dict[str, Any]
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log tick
    evals: list[dict[str, float]] = field(default_factory=list)  # one row per in-training evaluation
    scaler_d: torch.amp.GradScaler | None = None  # fp16 loss scaling, one per player
    scaler_g: torch.amp.GradScaler | None = None
    ada_p: float = 0.0  # ADA augmentation probability
    ada_acc: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum and count of r_t since the last adjust
    pools: dict[str, cyclegan.ImagePool] = field(default_factory=dict)  # CycleGAN: past fakes shown to D_X, D_Y
    monitor: Monitor = field(default_factory=Monitor)  # the stability monitor's state (pipeline.monitor)
    lr_scale: float = 1.0  # both learning rates times this: train.rollback_lr_factor per rollback
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # on_divergence rollback: the last healthy states
    monitor_window: dict[str, Any] = field(default_factory=dict)  # the monitor's open window at a checkpoint


def build_gan(
    cfg: Config, sample_shape: list[int], device: torch.device | str = "cpu", num_classes: int | None = None
) -> GAN:
    """G, D, EMA and optimizers; `num_classes` is required when model.conditional is on.

    For model.family cyclegan, G is the generator pair (`G.xy`, `G.yx`) and D the discriminator
    pair (`D.x`, `D.y`): one optimizer per pair, as in the CycleGAN reference.
    """
    if cfg.model.conditional and not num_classes:
        raise ValueError("model.conditional: needs labelled data (a dataset with classes, or an npz with 'y')")
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    if cfg.model.family == "cyclegan":
        spec = cyclegan.generator_spec(cfg.model, sample_shape)
    else:
        spec = generator_spec(cfg.model, sample_shape, num_classes)
    G = build_generator(spec).to(device)
    D = build_discriminator(cfg.model, sample_shape, num_classes).to(device)
    t = cfg.train
    if t.channels_last and ARCHS[cfg.model.arch].kind == "images":
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if t.ema > 0 else None
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=t.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=t.betas)
    gan = GAN(G, D, G_ema, opt_g, opt_d, spec, monitor=new_monitor(cfg))
    if cfg.model.family == "cyclegan":
        gan.pools = {"x": cyclegan.ImagePool(t.pool_size), "y": cyclegan.ImagePool(t.pool_size)}
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


def autocast(cfg: Config, device: torch.device):
    """Mixed-precision context for forward passes (a no-op for fp32)."""
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
class Shard:
    """This worker's slice of the global batch."""

    rank: int = 0
    world: int = 1

    def take(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.world
        return t[self.rank * n : (self.rank + 1) * n]


GradSync = Callable[[torch.nn.Module], None]


def no_sync(_: torch.nn.Module) -> None:
    return None


@dataclass
class Hooks:
    """What the loop calls out to. Defaults do nothing (a bare loop, as in the benchmark)."""

    sync_grads: GradSync = no_sync  # average .grad across workers
    on_event: Callable[[GAN, dict[str, Any]], None] = lambda gan, event: None  # a stability verdict or a rollback
    on_log: Callable[[int, dict[str, float]], None] = lambda step, stats: None
    on_checkpoint: Callable[[GAN, bool], None] = lambda gan, final: None
    on_eval: Callable[[GAN], dict[str, float]] = lambda gan: {}  # in-training metrics ({} = none)
    reduce_stats: Callable[[dict[str, float]], dict[str, float]] = lambda s: s


DEVICE_DATA_BYTES = 1 << 30  # training data up to this size live on the GPU; larger stay in host memory


def place_data(t: torch.Tensor | None, device: torch.device | str, limit: int = DEVICE_DATA_BYTES):
    """`t` on `device` when it is at most `limit` bytes (batches are then indexed there), else left in
    host memory (each step then copies only its batch): a user's large dataset is not copied whole to
    every GPU."""
    if t is None or torch.device(device).type == "cpu" or t.numel() * t.element_size() > limit:
        return t
    return t.to(device)


@dataclass
class Batches:
    """Draws global batches from the training data, sliced to one worker, on `device`.

    The data stay where they are given: on the device when they fit there (indexed there), or in
    host memory (indexed there, and only the batch is copied). Every random draw comes from
    `draws` (pipeline.draws): the same values on every device, staged in one copy per step.
    """

    x: torch.Tensor
    batch_size: int  # global
    z_dim: int
    seed: int
    shard: Shard = field(default_factory=Shard)
    y: torch.Tensor | None = None  # labels of x, for conditional models
    num_classes: int = 0
    x_b: torch.Tensor | None = None  # CycleGAN: domain B (Y) images, unpaired with x (X)
    device: torch.device | None = None  # where training runs (default: x's device)
    channels_last: bool = False  # image batches in channels-last memory format, like the models
    heldout: torch.Tensor | None = None  # reals never trained on (the validation split): D's overfitting
    heldout_y: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device or self.x.device)
        self.draws = StepDraws(self.seed, self.device)

    def begin(self, step: int) -> None:
        """Stage every draw of `step` (see pipeline.draws.StepDraws)."""
        self.draws.begin(step)

    def stream(self, step: int, phase: int):
        return self.draws.stream(step, phase)

    def reals_index(self, step: int, phase: int) -> torch.Tensor:
        """The rows of `x` that `reals(step, phase)` takes (this worker's slice)."""
        return self._index(step, phase, len(self.x), self.x)

    def _index(self, step: int, phase: int, n: int, on: torch.Tensor) -> torch.Tensor:
        host = on.device.type == "cpu" and self.device.type != "cpu"
        return self.shard.take(self.stream(step, phase).randint(0, n, (self.batch_size,), host=host))

    def _take(self, data: torch.Tensor, step: int, phase: int) -> torch.Tensor:
        return self._to_device(data[self._index(step, phase, len(data), data)])

    def first(self, data: torch.Tensor, n: int) -> torch.Tensor:
        """The first `n` rows of `data` as a batch (no draw: the same rows at every call)."""
        return self._to_device(data[:n])

    def _to_device(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.device != self.device:  # data in host memory: copy only the batch
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        if rows.dtype == torch.uint8:  # rows of the uint8 image store: to [-1, 1] (as data.to_unit)
            rows = rows.to(torch.float32) / 127.5 - 1.0
        if self.channels_last and rows.dim() == 4:
            rows = rows.contiguous(memory_format=torch.channels_last)
        return rows

    def reals(self, step: int, phase: int) -> torch.Tensor:
        return self._take(self.x, step, phase)

    def reals_b(self, step: int, phase: int) -> torch.Tensor:
        """A batch of domain B, drawn independently of domain A's (unpaired)."""
        assert self.x_b is not None, "CycleGAN batches need domain B images (x_b)"
        return self._take(self.x_b, step, phase)

    def real_labels(self, step: int, phase: int) -> torch.Tensor | None:
        """The labels of `reals(step, phase)` (None when unlabelled)."""
        return None if self.y is None else self._take(self.y, step, phase)

    def random_labels(self, step: int, phase: int) -> torch.Tensor | None:
        """Labels uniform over the classes, for the generator step (None when unconditional)."""
        if not self.num_classes:
            return None
        return self.shard.take(self.stream(step, phase).randint(0, self.num_classes, (self.batch_size,)))

    def latents(self, step: int, phase: int) -> torch.Tensor:
        return self.shard.take(self.stream(step, phase).randn(self.batch_size, self.z_dim))

    def uniform(self, step: int, phase: int) -> torch.Tensor:
        return self.shard.take(self.stream(step, phase).rand(self.batch_size))


def loss_terms(cfg: Config) -> Terms:
    """The configured loss (pipeline.losses registry) with its weights: all the loop asks of it."""
    return terms(cfg.loss.name, cfg.loss.gp_weight, cfg.loss.clip, cfg.loss.r1_gamma)


def d_loss(gan: GAN, cfg: Config, batches: Batches, step: int, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's total loss (with penalties) for the k-th critic step of `step`, and its stats."""
    loss = loss_terms(cfg)
    real = batches.reals(step, Phase.critic(k, Phase.REALS))
    # conditional: fakes are drawn for the reals' labels, so the penalties see one label per pair
    y = batches.real_labels(step, Phase.critic(k, Phase.REALS)) if batches.num_classes else None
    with autocast(cfg, real.device):
        with torch.no_grad():
            fake = gan.G(batches.latents(step, Phase.critic(k, Phase.LATENTS)), *_y(y))
        probe = probing(step, cfg)
        # one sample has no spread: a batch of 1 per worker would read as a collapse
        spread = batch_spread(fake, real) if probe and real.shape[0] > 1 else None
        # augmentation (train.augment): reals and fakes alike, ADA with the same p
        real = _augment(gan, cfg, batches, real, step, Phase.critic(k, Phase.AUGMENT_REAL))
        fake = _augment(gan, cfg, batches, fake, step, Phase.critic(k, Phase.AUGMENT_FAKE))
        d_real, d_fake = gan.D(real, *_y(y)).float(), gan.D(fake, *_y(y)).float()
    total = loss.d(d_real, d_fake)
    stats = {"loss/D": total.detach()}
    if probe:  # the monitor's signals (see `probing`)
        stats["D/acc_real"], stats["D/acc_fake"] = loss.accuracy(d_real.detach(), d_fake.detach())
    if spread is not None:
        stats["fake/spread"] = spread
    if cfg.train.ada.enabled:
        stats["ada/r_t"] = overfit_signal(d_real)
    mix = Phase.critic(k, Phase.INTERPOLATION)
    total, penalties = loss.regularise(total, [(gan.D, real, fake, y)], lambda _: batches.uniform(step, mix))
    stats.update(penalties)
    stats["D/real"], stats["D/fake"] = loss.report(d_real.detach()), loss.report(d_fake.detach())
    return total, stats


def batch_spread(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The fakes' spread across the batch over the reals': mean per-dimension standard deviation, a
    ratio (0 when every fake is the same: mode collapse). No grad."""
    with torch.no_grad():
        sd_f = fake.detach().float().flatten(1).std(0, correction=0).mean()
        sd_r = real.detach().float().flatten(1).std(0, correction=0).mean()
        return sd_f / sd_r.clamp_min(1e-12)


Probe = tuple[torch.Tensor, torch.Tensor]  # (fakes, D's scores on them) of the generator step
PROBE_EVERY = 10  # the monitor's per-step signals are measured on every 10th step: 5 a 50-step window


def probing(step: int, cfg: Config) -> bool:
    """Whether `step` measures the monitor's signals: every PROBE_EVERY-th step and the last step of
    each monitor window (so every window has one, whatever train.monitor_every). The same steps on
    every worker."""
    return step % PROBE_EVERY == 0 or (step + 1) % cfg.train.monitor_every == 0


def g_loss(
    gan: GAN, cfg: Config, batches: Batches, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Probe | None]:
    """G's loss, its stats and, on probing steps, the probe: the fakes and their scores, whose
    gradients (`probe_stats`) say whether G still learns."""
    z, y = batches.latents(step, Phase.G_LATENTS), batches.random_labels(step, Phase.G_LABELS)
    probe = probing(step, cfg)
    with autocast(cfg, z.device):
        fake = gan.G(z, *_y(y))
        if probe:
            fake.retain_grad()
        scores = gan.D(_augment(gan, cfg, batches, fake, step, Phase.G_AUGMENT), *_y(y)).float()
        if probe:
            scores.retain_grad()
    loss = loss_terms(cfg).g(scores)
    return loss, {"loss/G": loss.detach()}, (fake, scores) if probe else None


def probe_stats(probe: Probe, grads: tuple[torch.Tensor | None, torch.Tensor | None], scale=1.0) -> dict:
    """The generator's gradient at its fakes, per loss term: `grad/G_fakes` = mean ||d l_i / d x||
    over the fakes, `grad/G_scores` = mean |d l_i / d s_i| over D's scores (the loss's slope: under
    the saturating minimax loss it is D(G(z)), which vanishes when D wins). `scale`: the fp16 loss
    scale these gradients carry; a step the scaler skips (inf/NaN gradients) reads as 0, as its
    gradient norms do."""
    fake, scores = probe
    g_fake, g_scores = grads
    if g_fake is None or g_scores is None:
        return {}
    n = scores.numel()  # loss terms (fewer than fakes when packed)
    out = {
        "grad/G_fakes": g_fake.detach().float().flatten(1).norm(dim=1).mean() * n / scale,
        "grad/G_scores": g_scores.detach().float().abs().mean() * n / scale,
    }
    if scale != 1.0:
        out = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0) for k, v in out.items()}
    return out


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all of `module`'s gradients (0 when it has none), no host sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _y(y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Extra positional model inputs: (y,) for conditional models, () otherwise."""
    return () if y is None else (y,)


def _augment(gan: GAN, cfg: Config, batches: Batches, x: torch.Tensor, step: int, phase: int) -> torch.Tensor:
    """What D sees of `x` under `train.augment` (the draws of `phase` at `step`)."""
    if cfg.train.augment == "none":
        return x
    stream, shard = batches.stream(step, phase), (batches.shard.rank, batches.shard.world)
    if cfg.train.augment == "diffaugment":
        return diffaugment(x, stream, shard)
    return augment(x, gan.ada_p, stream, shard=shard)


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


def _backward_apply(
    total: torch.Tensor, opt: torch.optim.Optimizer, module: torch.nn.Module, sync: GradSync, scaler, measure: bool
) -> dict[str, torch.Tensor]:
    """Backward, average gradients across workers, step (through the fp16 loss scaler if any); with
    `measure`, returns {"norm": the averaged gradient's norm} (a skipped fp16 step's inf/NaN reads as 0)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
        return _apply(opt, module, sync, measure)
    scaler.scale(total).backward()
    sync(module)  # scaled gradients average the same way; every worker then sees the same inf/NaN
    out = {}
    if measure:
        out["scale"] = float(scaler.get_scale())  # what this step's gradients carry (update() changes it)
        scaler.unscale_(opt)  # step() then uses these unscaled gradients as they are
        out["norm"] = torch.nan_to_num(grad_norm(module), nan=0.0, posinf=0.0)
    scaler.step(opt)
    scaler.update()
    return out


def _apply(opt: torch.optim.Optimizer, module: torch.nn.Module, sync: GradSync, measure: bool) -> dict:
    sync(module)
    out = {"norm": grad_norm(module)} if measure else {}
    opt.step()
    return out


def _norm_stat(name: str, measured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: measured["norm"]} if measured else {}


def d_step(gan: GAN, cfg: Config, batches: Batches, step: int, k: int, sync: GradSync) -> dict[str, torch.Tensor]:
    total, stats = d_loss(gan, cfg, batches, step, k)
    stats.update(_norm_stat("grad/D", _backward_apply(total, gan.opt_d, gan.D, sync, gan.scaler_d, probing(step, cfg))))
    loss_terms(cfg).after_d_step(gan.D)
    return stats


def g_step(gan: GAN, cfg: Config, batches: Batches, step: int, sync: GradSync) -> dict[str, torch.Tensor]:
    total, stats, probe = g_loss(gan, cfg, batches, step)
    measured = _backward_apply(total, gan.opt_g, gan.G, sync, gan.scaler_g, probe is not None)
    stats.update(_norm_stat("grad/G", measured))
    if probe:
        stats.update(probe_stats(probe, (probe[0].grad, probe[1].grad), measured.get("scale", 1.0)))
    if gan.G_ema is not None:
        _update_ema(gan.G_ema, gan.G, ema_decay(cfg.train.ema, gan.step))
    return stats


def simultaneous_step(gan: GAN, cfg: Config, batches: Batches, step: int, sync: GradSync) -> dict[str, torch.Tensor]:
    """Both players' gradients taken at the same point, then both step (gradient descent-ascent)."""
    d_total, stats = d_loss(gan, cfg, batches, step, 0)
    g_total, g_stats, probe = g_loss(gan, cfg, batches, step)
    for total, module, opt, extra in ((d_total, gan.D, gan.opt_d, ()), (g_total, gan.G, gan.opt_g, probe or ())):
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params + list(extra), retain_graph=True, allow_unused=True)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        if extra:
            g_stats.update(probe_stats(probe, grads[len(params) :]))
    stats.update(_norm_stat("grad/D", _apply(gan.opt_d, gan.D, sync, probing(step, cfg))))
    g_stats.update(_norm_stat("grad/G", _apply(gan.opt_g, gan.G, sync, probing(step, cfg))))
    loss_terms(cfg).after_d_step(gan.D)
    if gan.G_ema is not None:
        _update_ema(gan.G_ema, gan.G, ema_decay(cfg.train.ema, gan.step))
    return {**stats, **g_stats}


# ---- CycleGAN: G and F step together, then D_X and D_Y (the reference's order) -------------------


def cycle_g_loss(
    gan: GAN, cfg: Config, real_x: torch.Tensor, real_y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The generator pair's loss: adversarial (both directions, `loss.name`) + cycle_weight * L1 cycle
    (|F(G(x)) - x| + |G(F(y)) - y|) + identity_weight * L1 identity (|G(y) - y| + |F(x) - x|).
    Returns (total, stats, (fake_x = F(y), fake_y = G(x))). With a weight of 0 its term is computed
    without a graph (logged only: it cannot touch the gradients); identity is skipped when off."""
    loss, G, D, lw = loss_terms(cfg), gan.G, gan.D, cfg.loss
    with autocast(cfg, real_x.device):
        fake_y, fake_x = G.xy(real_x), G.yx(real_y)
        adv = loss.g(D.y(fake_y).float()) + loss.g(D.x(fake_x).float())
        with torch.set_grad_enabled(torch.is_grad_enabled() and lw.cycle_weight > 0):
            cyc = (G.yx(fake_y).float() - real_x).abs().mean() + (G.xy(fake_x).float() - real_y).abs().mean()
        total = adv + lw.cycle_weight * cyc if lw.cycle_weight > 0 else adv
        stats = {"loss/G_adv": adv.detach(), "loss/cycle": cyc.detach()}
        if lw.identity_weight > 0:
            idt = (G.xy(real_y).float() - real_y).abs().mean() + (G.yx(real_x).float() - real_x).abs().mean()
            total = total + lw.identity_weight * idt
            stats["loss/identity"] = idt.detach()
    stats["loss/G"] = total.detach()
    return total, stats, (fake_x, fake_y)


def cycle_d_loss(
    gan: GAN, cfg: Config, batches: Batches, step: int, k: int, reals: tuple, fakes: tuple
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D_X and D_Y's summed loss on reals vs fakes from the history pools (with penalties)."""
    loss, D = loss_terms(cfg), gan.D
    shard = (batches.shard.rank, batches.shard.world)
    real_x, real_y = reals
    fake_x = gan.pools["x"].query(fakes[0], step_generator(cfg.seed, step, Phase.critic(k, Phase.POOL_X)), shard)
    fake_y = gan.pools["y"].query(fakes[1], step_generator(cfg.seed, step, Phase.critic(k, Phase.POOL_Y)), shard)
    pairs = ((D.x, real_x, fake_x), (D.y, real_y, fake_y))
    with autocast(cfg, real_x.device):
        scores = [(d(r).float(), d(f).float()) for d, r, f in pairs]
    total = sum(loss.d(sr, sf) for sr, sf in scores)
    stats = {"loss/D": total.detach()}
    total, penalties = loss.regularise(
        total,
        [(d, r, f, None) for d, r, f in pairs],
        lambda i: batches.uniform(step, Phase.critic(k, Phase.PENALTY_X) + i),
    )
    stats.update(penalties)
    stats["D/real"] = sum(loss.report(sr.detach()) for sr, _ in scores) / 2
    stats["D/fake"] = sum(loss.report(sf.detach()) for _, sf in scores) / 2
    return total, stats


def cycle_step(gan: GAN, cfg: Config, batches: Batches, step: int, sync: GradSync) -> dict[str, torch.Tensor]:
    """One CycleGAN step: both generators on one batch of each domain, then `n_critic` steps of both
    discriminators (the first on the generators' fakes; later ones on fresh batches)."""
    reals = (batches.reals(step, Phase.critic(0, Phase.REALS)), batches.reals_b(step, Phase.critic(0, Phase.REALS_B)))
    total, stats, fakes = cycle_g_loss(gan, cfg, *reals)
    stats.update(_norm_stat("grad/G", _backward_apply(total, gan.opt_g, gan.G, sync, gan.scaler_g, probing(step, cfg))))
    if gan.G_ema is not None:
        _update_ema(gan.G_ema, gan.G, ema_decay(cfg.train.ema, gan.step))
    for k in range(cfg.train.n_critic):
        if k > 0:
            reals = (
                batches.reals(step, Phase.critic(k, Phase.REALS)),
                batches.reals_b(step, Phase.critic(k, Phase.REALS_B)),
            )
            with torch.no_grad(), autocast(cfg, reals[0].device):
                fakes = (gan.G.yx(reals[1]), gan.G.xy(reals[0]))
        d_total, d_stats = cycle_d_loss(gan, cfg, batches, step, k, reals, tuple(f.detach() for f in fakes))
        measured = _backward_apply(d_total, gan.opt_d, gan.D, sync, gan.scaler_d, probing(step, cfg))
        d_stats.update(_norm_stat("grad/D", measured))
        loss_terms(cfg).after_d_step(gan.D)
        stats.update(d_stats)
    return stats


def ema_decay(decay: float, step: int) -> float:
    """EMA decay with a warm-up: min(decay, (1 + step) / (10 + step)), so the average forgets the random
    initial weights within the first steps instead of over ~1 / (1 - decay) steps."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


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
    t = cfg.train
    sums, tick = _Sums(gan.monitor_window), time.perf_counter()
    gan.G.train()
    gan.D.train()
    while gan.step < t.steps:
        step = gan.step
        if t.lr_decay:  # the schedule's rates for this step (train.lr_decay)
            set_learning_rates(gan, cfg)
        batches.begin(step)
        if cfg.model.family == "cyclegan":
            stats = cycle_step(gan, cfg, batches, step, hooks.sync_grads)
        elif t.update == "simultaneous":
            stats = simultaneous_step(gan, cfg, batches, step, hooks.sync_grads)
        else:
            stats = {}
            for k in range(t.n_critic):
                stats.update(d_step(gan, cfg, batches, step, k, hooks.sync_grads))
            stats.update(g_step(gan, cfg, batches, step, hooks.sync_grads))
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
    if batches.heldout is None or decision is None or cfg.model.family == "cyclegan":
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
            gan.D(batches.first(x, n), *_y(batches.first(y, n) if batches.num_classes else None)).float()
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
        out = torch.cat([G(z[i : i + batch], *_y(None if y is None else y[i : i + batch])) for i in range(0, n, batch)])
    G.train(was_training)
    return out.float().cpu().numpy()


def sample_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    return None if not num_classes else torch.arange(n) % num_classes
