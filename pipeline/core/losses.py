"""GAN losses on raw discriminator scores (logits for the probabilistic losses). Pure torch.

Each entry of the registry `LOSSES` gives the discriminator's loss from scores on reals and fakes
and the generator's loss from scores on fakes (both means over the batch, so averaging gradients
across workers equals the gradient on the global batch), and declares what it asks of training: its
own penalty, weight clipping, per-sample critics. `Terms` binds a loss to its weights from params;
the training loop talks to it only, and never to a loss name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Scores = torch.Tensor


@dataclass(frozen=True)
class Loss:
    """A GAN objective on raw discriminator scores: D's and G's terms, and what it asks of training.

    `sigmoid_report`: D/real and D/fake are reported as mean sigmoid(score) (the probabilistic
    losses, whose scores are logits, and LSGAN, as it always was); otherwise (critics, hinge margins)
    as mean raw score. `decision`: the score above which D calls a sample real (0 for logits and
    hinge margins, 0.5 between LSGAN's targets 0 and 1); None for Wasserstein critics, whose offset is
    arbitrary (the stability monitor then splits at the midpoint of the batch means). `per_sample_critic`: the critic must score
    each sample alone (the Kantorovich dual; a per-sample penalty), so batch norm is refused.
    `gradient_penalty`: WGAN-GP's penalty is part of the loss. `clips_weights`: WGAN's weight
    clipping after every critic step. Weights come from params (`Terms`).
    """

    d: Callable[[Scores, Scores], torch.Tensor]
    g: Callable[[Scores], torch.Tensor]
    sigmoid_report: bool
    decision: float | None = 0.0
    per_sample_critic: bool = False
    gradient_penalty: bool = False
    clips_weights: bool = False


def _bce_d(r: Scores, f: Scores) -> torch.Tensor:
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid(score), written stably
    return F.softplus(-r).mean() + F.softplus(f).mean()


def _wgan_d(r: Scores, f: Scores) -> torch.Tensor:
    return f.mean() - r.mean()


def _neg_mean(f: Scores) -> torch.Tensor:
    return -f.mean()


# the registry: a new loss is one entry here (with its test); config and training ask it, never a name
LOSSES: dict[str, Loss] = {
    # original minimax: G minimises log(1 - D(G(z))) = -softplus(score); saturates when D wins
    "minimax": Loss(_bce_d, lambda f: -F.softplus(f).mean(), sigmoid_report=True),
    # non-saturating: G minimises -log D(G(z))
    "nonsaturating": Loss(_bce_d, lambda f: F.softplus(-f).mean(), sigmoid_report=True),
    "wgan": Loss(_wgan_d, _neg_mean, sigmoid_report=False, decision=None, per_sample_critic=True, clips_weights=True),
    "wgan-gp": Loss(
        _wgan_d, _neg_mean, sigmoid_report=False, decision=None, per_sample_critic=True, gradient_penalty=True
    ),
    "lsgan": Loss(
        lambda r, f: 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f**2).mean(),
        lambda f: 0.5 * ((f - 1) ** 2).mean(),
        sigmoid_report=True,
        decision=0.5,
    ),
    "hinge": Loss(lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(), _neg_mean, sigmoid_report=False),
}


Pair = tuple[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (D, real, fake, labels)


@dataclass(frozen=True)
class Terms:
    """A loss with its weights from params: everything the training loop asks of the objective.

    `regularise` adds the penalties to D's loss (WGAN-GP's, which the loss owns, and R1, which any
    loss may take), over one or more (D, real, fake, labels) pairs (CycleGAN has two critics).
    `after_d_step` is WGAN's weight clipping. `report` turns scores into D/real and D/fake.
    """

    loss: Loss
    gp_weight: float = 10.0
    clip: float = 0.01
    r1_gamma: float = 0.0

    def d(self, real: Scores, fake: Scores) -> torch.Tensor:
        return self.loss.d(real, fake)

    def g(self, fake: Scores) -> torch.Tensor:
        return self.loss.g(fake)

    def report(self, scores: Scores) -> torch.Tensor:
        return torch.sigmoid(scores).mean() if self.loss.sigmoid_report else scores.mean()

    def accuracy(self, real: Scores, fake: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        """D's accuracy on reals (scores above the loss's decision threshold) and on fakes (below it).
        Wasserstein critics have no threshold: the midpoint of the two batch means stands in."""
        cut = self.loss.decision if self.loss.decision is not None else (real.mean() + fake.mean()) / 2
        return (real > cut).float().mean(), (fake < cut).float().mean()

    def regularise(
        self, total: torch.Tensor, pairs: list[Pair], eps: Callable[[int], torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`total` plus the weighted penalties, and their values; `eps(i)` draws the interpolation
        weights of pair i (asked for only when the loss has a gradient penalty)."""
        stats: dict[str, torch.Tensor] = {}
        if self.loss.gradient_penalty:
            gp = sum(gradient_penalty(d, r, f, eps(i), y) for i, (d, r, f, y) in enumerate(pairs))
            total = total + self.gp_weight * gp
            stats["loss/gp"] = gp.detach()
        if self.r1_gamma > 0:
            r1 = sum(r1_penalty(d, r, y) for d, r, _, y in pairs)
            total = total + 0.5 * self.r1_gamma * r1
            stats["loss/r1"] = r1.detach()
        return total, stats

    @torch.no_grad()
    def after_d_step(self, D: torch.nn.Module) -> None:
        if self.loss.clips_weights:  # weight clipping keeps the critic in a Lipschitz family
            for p in D.parameters():
                p.clamp_(-self.clip, self.clip)


def terms(name: str, gp_weight: float = 10.0, clip: float = 0.01, r1_gamma: float = 0.0) -> Terms:
    """The loss `name` of the registry with its params (loss.gp_weight, loss.clip, loss.r1_gamma)."""
    return Terms(LOSSES[name], gp_weight, clip, r1_gamma)


def gradient_penalty(
    D: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """WGAN-GP: E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake.

    `eps` has one value per sample, shape (B,). The graph is kept (create_graph) so the penalty's
    own gradient flows back into D (a double backward).
    """
    shape = (-1,) + (1,) * (real.dim() - 1)
    x_hat = (eps.view(shape) * real + (1 - eps.view(shape)) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(_score(D, x_hat, y).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def r1_penalty(D: torch.nn.Module, real: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """R1: E[||grad D(x)||^2] on reals (multiply by gamma / 2). `y`: labels for a conditional D."""
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_score(D, x, y).sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def _score(D: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return D(x) if y is None else D(x, y)
