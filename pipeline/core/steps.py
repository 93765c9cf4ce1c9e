"""One optimisation step of a GAN's two players, free of the loop, Ray and MLflow.

The pieces every objective (pipeline.core.objectives) steps with: the `GAN` state, `Batches` (this
worker's slice of the global batch, every draw keyed by (seed, step, phase): pipeline.core.draws), the
configured loss's terms with their penalties, backward + gradient sync + optimizer step (through the
fp16 loss scaler when there is one), the generator's EMA, and the stability monitor's per-step probes.
`gan_step` is the GAN's step: `n_critic` critic steps then one generator step, or both players at
once (train.update: simultaneous). The loop that calls a step lives in pipeline.core.training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.core.augment import augment, diffaugment, overfit_signal
from pipeline.core.config import Config
from pipeline.core.draws import Phase, StepDraws
from pipeline.core.losses import Terms, terms
from pipeline.core.monitor import Monitor


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
    pools: dict[str, Any] = field(default_factory=dict)  # the objective's own state (CycleGAN: its history pools)
    monitor: Monitor = field(default_factory=Monitor)  # the stability monitor's state (pipeline.core.monitor)
    lr_scale: float = 1.0  # both learning rates times this: train.rollback_lr_factor per rollback
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # on_divergence rollback: the last healthy states
    monitor_window: dict[str, Any] = field(default_factory=dict)  # the monitor's open window at a checkpoint


def autocast(cfg: Config, device: torch.device):
    """Mixed-precision context for forward passes (a no-op for fp32)."""
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    `draws` (pipeline.core.draws): the same values on every device, staged in one copy per step.
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
        """Stage every draw of `step` (see pipeline.core.draws.StepDraws)."""
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
    """The configured loss (pipeline.core.losses registry) with its weights: all the loop asks of it."""
    return terms(cfg.loss.name, cfg.loss.gp_weight, cfg.loss.clip, cfg.loss.r1_gamma)


def d_loss(gan: GAN, cfg: Config, batches: Batches, step: int, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's total loss (with penalties) for the k-th critic step of `step`, and its stats."""
    loss = loss_terms(cfg)
    real = batches.reals(step, Phase.critic(k, Phase.REALS))
    # conditional: fakes are drawn for the reals' labels, so the penalties see one label per pair
    y = batches.real_labels(step, Phase.critic(k, Phase.REALS)) if batches.num_classes else None
    with autocast(cfg, real.device):
        with torch.no_grad():
            fake = gan.G(batches.latents(step, Phase.critic(k, Phase.LATENTS)), *label_args(y))
        probe = probing(step, cfg)
        # one sample has no spread: a batch of 1 per worker would read as a collapse
        spread = batch_spread(fake, real) if probe and real.shape[0] > 1 else None
        # augmentation (train.augment): reals and fakes alike, ADA with the same p
        real = d_view(gan, cfg, batches, real, step, Phase.critic(k, Phase.AUGMENT_REAL))
        fake = d_view(gan, cfg, batches, fake, step, Phase.critic(k, Phase.AUGMENT_FAKE))
        d_real, d_fake = gan.D(real, *label_args(y)).float(), gan.D(fake, *label_args(y)).float()
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
        fake = gan.G(z, *label_args(y))
        if probe:
            fake.retain_grad()
        scores = gan.D(d_view(gan, cfg, batches, fake, step, Phase.G_AUGMENT), *label_args(y)).float()
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


def label_args(y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Extra positional model inputs: (y,) for conditional models, () otherwise."""
    return () if y is None else (y,)


def d_view(gan: GAN, cfg: Config, batches: Batches, x: torch.Tensor, step: int, phase: int) -> torch.Tensor:
    """What D sees of `x` under `train.augment` (the draws of `phase` at `step`)."""
    if cfg.train.augment == "none":
        return x
    stream, shard = batches.stream(step, phase), (batches.shard.rank, batches.shard.world)
    if cfg.train.augment == "diffaugment":
        return diffaugment(x, stream, shard)
    return augment(x, gan.ada_p, stream, shard=shard)


def backward_apply(
    total: torch.Tensor, opt: torch.optim.Optimizer, module: torch.nn.Module, sync: GradSync, scaler, measure: bool
) -> dict[str, torch.Tensor]:
    """Backward, average gradients across workers, step (through the fp16 loss scaler if any); with
    `measure`, returns {"norm": the averaged gradient's norm} (a skipped fp16 step's inf/NaN reads as 0)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        total.backward()
        return apply_step(opt, module, sync, measure)
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


def apply_step(opt: torch.optim.Optimizer, module: torch.nn.Module, sync: GradSync, measure: bool) -> dict:
    sync(module)
    out = {"norm": grad_norm(module)} if measure else {}
    opt.step()
    return out


def norm_stat(name: str, measured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: measured["norm"]} if measured else {}


def d_step(gan: GAN, cfg: Config, batches: Batches, step: int, k: int, sync: GradSync) -> dict[str, torch.Tensor]:
    total, stats = d_loss(gan, cfg, batches, step, k)
    stats.update(norm_stat("grad/D", backward_apply(total, gan.opt_d, gan.D, sync, gan.scaler_d, probing(step, cfg))))
    loss_terms(cfg).after_d_step(gan.D)
    return stats


def g_step(gan: GAN, cfg: Config, batches: Batches, step: int, sync: GradSync) -> dict[str, torch.Tensor]:
    total, stats, probe = g_loss(gan, cfg, batches, step)
    measured = backward_apply(total, gan.opt_g, gan.G, sync, gan.scaler_g, probe is not None)
    stats.update(norm_stat("grad/G", measured))
    if probe:
        stats.update(probe_stats(probe, (probe[0].grad, probe[1].grad), measured.get("scale", 1.0)))
    if gan.G_ema is not None:
        update_ema(gan.G_ema, gan.G, ema_decay(cfg.train.ema, gan.step))
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
    stats.update(norm_stat("grad/D", apply_step(gan.opt_d, gan.D, sync, probing(step, cfg))))
    g_stats.update(norm_stat("grad/G", apply_step(gan.opt_g, gan.G, sync, probing(step, cfg))))
    loss_terms(cfg).after_d_step(gan.D)
    if gan.G_ema is not None:
        update_ema(gan.G_ema, gan.G, ema_decay(cfg.train.ema, gan.step))
    return {**stats, **g_stats}


def ema_decay(decay: float, step: int) -> float:
    """EMA decay with a warm-up: min(decay, (1 + step) / (10 + step)), so the average forgets the random
    initial weights within the first steps instead of over ~1 / (1 - decay) steps."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def gan_step(gan: GAN, cfg: Config, batches: Batches, step: int, sync: GradSync) -> dict[str, torch.Tensor]:
    """The GAN's step: `n_critic` critic steps then one generator step (alternating), or both players'
    gradients at the same point (train.update: simultaneous)."""
    if cfg.train.update == "simultaneous":
        return simultaneous_step(gan, cfg, batches, step, sync)
    stats: dict[str, torch.Tensor] = {}
    for k in range(cfg.train.n_critic):
        stats.update(d_step(gan, cfg, batches, step, k, sync))
    stats.update(g_step(gan, cfg, batches, step, sync))
    return stats
