"""CycleGAN (Zhu et al. 2017): unpaired translation between domains X (data.name) and Y (data.target).

Pure torch, no I/O. The pieces the training loop and the evaluate stage use:

- `CycleGenerators`: G: X -> Y (`xy`) and F: Y -> X (`yx`), each a small ResNet translator
  (7x7 conv, one stride-2 down-sampling, `blocks` residual blocks, one up-sampling, 7x7 conv, tanh):
  images (N, C, H, W) in [-1, 1] -> same shape in [-1, 1]. One module holding both, so one
  optimizer, one EMA, one gradient all-reduce and one checkpoint entry cover both generators.
- `CycleDiscriminators`: D_X (`x`) and D_Y (`y`), each the DCGAN discriminator with `model.d_norm`.
- `ImagePool`: the history of past fakes D is shown (Shrivastava et al. 2017), seeded by the step.
- `cycle_step`: one training step (both generators, then `n_critic` steps of both discriminators on
  fakes from the pools); pipeline.core.objectives hands it to the loop.
- `cycle_diagnostics`: cycle reconstruction error, and the same error after low-amplitude noise is
  added to the translation: a generator pair that hides its input in an imperceptible signal
  (Chu et al. 2017, "CycleGAN, a master of steganography") reconstructs far worse from noisy
  translations than the noise itself explains.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Config, ModelConfig
from pipeline.core.draws import Phase, step_generator
from pipeline.core.models import DCGANDiscriminator
from pipeline.core.steps import (
    GAN,
    Batches,
    GradSync,
    autocast,
    backward_apply,
    ema_decay,
    loss_terms,
    norm_stat,
    probing,
    update_ema,
)

NOISE_STD = 0.05  # the diagnostic's Gaussian noise on translations: 2.5% of the [-1, 1] range
HIDDEN_GAIN = 4.0  # reconstruction error growing more than 4x the noise it was given: information is hidden


# ---- networks --------------------------------------------------------------------------------


def _in(ch: int) -> nn.Module:
    return nn.InstanceNorm2d(ch, affine=True)


def _conv(a: int, b: int, k: int, stride: int = 1, padding: int = 0) -> nn.Module:
    # no bias before instance norm: it subtracts the mean, so a bias there gets a zero gradient, which
    # Adam would turn into steps driven by rounding noise (and workers would disagree on them)
    return nn.Conv2d(a, b, k, stride, padding, bias=False)


class _Residual(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            _conv(ch, ch, 3),
            _in(ch),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            _conv(ch, ch, 3),
            _in(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Translator(nn.Module):
    """Images (N, C, H, W) in [-1, 1], H and W even -> images of the same shape in [-1, 1]."""

    def __init__(self, channels: int, base: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(3), _conv(channels, base, 7), _in(base), nn.ReLU(),
            _conv(base, 2 * base, 3, 2, 1), _in(2 * base), nn.ReLU(),
            *[_Residual(2 * base) for _ in range(blocks)],
            nn.ConvTranspose2d(2 * base, base, 3, 2, 1, output_padding=1, bias=False), _in(base), nn.ReLU(),
            nn.ReflectionPad2d(3), nn.Conv2d(base, channels, 7), nn.Tanh(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGenerators(nn.Module):
    """`xy` = G: X -> Y and `yx` = F: Y -> X. `forward(x)` is G(x), the X -> Y direction."""

    def __init__(self, shape: tuple[int, int, int], base: int, blocks: int):
        super().__init__()
        assert shape[1] % 2 == 0 and shape[2] % 2 == 0, f"translators need even image sides, got {shape}"
        self.xy, self.yx = Translator(shape[0], base, blocks), Translator(shape[0], base, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.xy(x)


class CycleDiscriminators(nn.Module):
    """`x` = D_X judges images of X (reals vs F(y)); `y` = D_Y judges Y (reals vs G(x))."""

    def __init__(self, model: ModelConfig, shape: tuple[int, int, int]):
        super().__init__()
        self.x = DCGANDiscriminator(shape, model.d_width, model.d_norm, model.d_activation)
        self.y = DCGANDiscriminator(shape, model.d_width, model.d_norm, model.d_activation)


def generator_spec(model: ModelConfig, sample_shape: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """What rebuilds the generator pair without the training config (saved in every checkpoint)."""
    return {
        "family": "cyclegan",
        "arch": "resnet",
        "hidden": model.hidden,
        "layers": model.layers,  # residual blocks per translator
        "sample_shape": list(sample_shape),
        "z_dim": None,
        "num_classes": None,
    }


def build_generators(spec: dict[str, Any]) -> CycleGenerators:
    return CycleGenerators(tuple(spec["sample_shape"]), spec["hidden"], spec["layers"])


# ---- image history pool ------------------------------------------------------------------------


class ImagePool:
    """A buffer of up to `size` past fakes (Shrivastava et al. 2017; CycleGAN's `ImagePool`).

    `query(images, g, shard)`, image by image: while the pool is not full, store the image and return it;
    once full, with probability 0.5 return a stored image chosen uniformly and put the new one in
    its slot, else return the new image. `size == 0` returns the images unchanged. All draws come
    from the generator `g` (keyed by the training step), drawn for the global batch of which
    `images` is worker `rank`'s slice (`shard = (rank, world)`), so a run and its resumption draw
    the same; `state_dict` holds the stored images, which is all a checkpoint needs. Each worker
    keeps its own pool (a pool is local, like the fakes it stores).
    """

    def __init__(self, size: int):
        self.size = size
        self.images: torch.Tensor | None = None  # (n_stored, C, H, W)

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    @torch.no_grad()
    def query(self, images: torch.Tensor, g: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        if self.size == 0:
            return images
        images = images.detach()
        n, (rank, world) = len(images), shard
        mine = slice(rank * n, (rank + 1) * n)
        use_old = (torch.rand(n * world, generator=g) < 0.5)[mine]
        slot = torch.randint(self.size, (n * world,), generator=g)[mine]
        out = images.clone()
        for i in range(n):
            if len(self) < self.size:
                new = images[i : i + 1].clone()
                self.images = new if self.images is None else torch.cat([self.images, new])
            elif use_old[i]:
                j = int(slot[i])
                out[i] = self.images[j]
                self.images[j] = images[i]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "images": None if self.images is None else self.images.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = None if state["images"] is None else state["images"].clone()


# ---- the step: G and F step together, then D_X and D_Y (the reference's order) -------------------


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
    stats.update(norm_stat("grad/G", backward_apply(total, gan.opt_g, gan.G, sync, gan.scaler_g, probing(step, cfg))))
    if gan.G_ema is not None:
        update_ema(gan.G_ema, gan.G, ema_decay(cfg.train.ema, gan.step))
    for k in range(cfg.train.n_critic):
        if k > 0:
            reals = (
                batches.reals(step, Phase.critic(k, Phase.REALS)),
                batches.reals_b(step, Phase.critic(k, Phase.REALS_B)),
            )
            with torch.no_grad(), autocast(cfg, reals[0].device):
                fakes = (gan.G.yx(reals[1]), gan.G.xy(reals[0]))
        d_total, d_stats = cycle_d_loss(gan, cfg, batches, step, k, reals, tuple(f.detach() for f in fakes))
        measured = backward_apply(d_total, gan.opt_d, gan.D, sync, gan.scaler_d, probing(step, cfg))
        d_stats.update(norm_stat("grad/D", measured))
        loss_terms(cfg).after_d_step(gan.D)
        stats.update(d_stats)
    return stats


# ---- evaluation ----------------------------------------------------------------------------------


def _device(net: nn.Module) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _batched(fn, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else x


@torch.no_grad()
def translate(net: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """net(x) in eval mode, in batches; images in, images out (numpy float32)."""
    was = net.training
    net.eval()
    device = _device(net)
    out = _batched(net, torch.as_tensor(np.asarray(x, np.float32)).to(device)).cpu().numpy()
    net.train(was)
    return out


@torch.no_grad()
def cycle_diagnostics(
    forward: nn.Module, backward: nn.Module, x: np.ndarray | torch.Tensor, seed: int, noise_std: float = NOISE_STD
) -> dict[str, Any]:
    """Cycle reconstruction of images x (N, C, H, W) through `forward` then `backward`, clean and
    with Gaussian noise (std `noise_std`, seeded) added to the translation.

    Returns `cycle_l1` = mean |backward(forward(x)) - x|, `cycle_l1_noisy` (the same with noise),
    `noise_ratio` = noisy / clean error, `noise_gain` = (noisy - clean error) / mean |noise|, and
    `hidden_information` = noise_gain > HIDDEN_GAIN. A pair that reconstructs from visible content
    passes the noise through at most about 1:1 (identity maps: gain 1); one that hides x in a
    low-amplitude signal amplifies it (a signal of amplitude a: gain about 1 / a).
    """
    was = forward.training, backward.training
    forward.eval(), backward.eval()
    device = _device(forward)  # a model being trained on a GPU is scored there
    x = torch.as_tensor(np.asarray(x, np.float32)).to(device)
    y = _batched(forward, x)
    noise = noise_std * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    clean = float((_batched(backward, y) - x).abs().mean())
    noisy = float((_batched(backward, y + noise) - x).abs().mean())
    forward.train(was[0]), backward.train(was[1])
    gain = (noisy - clean) / float(noise.abs().mean())
    return {
        "cycle_l1": clean,
        "cycle_l1_noisy": noisy,
        "noise_ratio": noisy / max(clean, 1e-8),
        "noise_gain": gain,
        "hidden_information": bool(gain > HIDDEN_GAIN),
    }


def translation_metrics(
    G: CycleGenerators,
    x_val: np.ndarray,
    y_val: np.ndarray | None,
    x_val_b: np.ndarray,
    y_val_b: np.ndarray | None,
    extractor_a,
    extractor_b,
    seed: int,
) -> dict[str, Any]:
    """Evaluation of a generator pair on the validation sets of both domains, keys `xy/...` for
    G: X -> Y (translations of X's images scored against Y's) and `yx/...` for F: Y -> X:

    - the image metrics of `metrics_image.score` (fid, kid, precision, recall, ...) in the
      target domain's extractor space, against the target domain's validation images;
    - `label_accuracy`: the target domain's classifier gives G(x) the label of x (when both
      domains are labelled; the models never saw the labels);
    - `cycle_diagnostics` (cycle_l1, cycle_l1_noisy, noise_ratio, noise_gain, hidden_information);

    plus `hidden_information`: true when either direction hides its input.
    """
    from pipeline.core import features, metrics_image

    out: dict[str, Any] = {}
    directions = (
        ("xy", G.xy, G.yx, x_val, y_val, x_val_b, extractor_b),
        ("yx", G.yx, G.xy, x_val_b, y_val_b, x_val, extractor_a),
    )
    for name, fwd, bwd, src, src_labels, target, extractor in directions:
        fake = translate(fwd, src)
        real_f, real_p = features.embed(extractor, target)
        fake_f, fake_p = features.embed(extractor, fake)
        sets = metrics_image.Sets(real_f, real_p, fake_f, fake_p, extractor.num_classes, seed, src_labels)
        m = metrics_image.score(sets)
        m.update(cycle_diagnostics(fwd, bwd, src, seed))
        out.update({f"{name}/{k}": v for k, v in m.items()})
    out["hidden_information"] = out["xy/hidden_information"] or out["yx/hidden_information"]
    return out


def triplets(G: CycleGenerators, x: np.ndarray, y: np.ndarray, n: int = 6) -> np.ndarray:
    """n plot rows of six images side by side, x | G(x) | F(G(x)) | y | F(y) | G(F(y)): (6n, C, H, W),
    for `plots.image_grid(..., nrow=6)`."""
    cols = []
    for src, fwd, bwd in ((x[:n], G.xy, G.yx), (y[:n], G.yx, G.xy)):
        t = translate(fwd, src)
        cols += [src, t, translate(bwd, t)]
    return np.stack(cols, 1).reshape(-1, *x.shape[1:])
