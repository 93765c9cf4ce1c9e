"""GAN losses on raw discriminator scores (logits for the probabilistic losses). Pure torch.

Each entry gives the discriminator's loss from scores on reals and fakes and the generator's
loss from scores on fakes; both are means over the batch, so averaging gradients across workers
equals the gradient on the global batch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

Scores = torch.Tensor


class Loss(NamedTuple):
    d: Callable[[Scores, Scores], torch.Tensor]
    g: Callable[[Scores], torch.Tensor]
    wasserstein: bool  # critic scores are unbounded estimates, not logits


def _bce_d(r: Scores, f: Scores) -> torch.Tensor:
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid(score), written stably
    return F.softplus(-r).mean() + F.softplus(f).mean()


def _wgan_d(r: Scores, f: Scores) -> torch.Tensor:
    return f.mean() - r.mean()


LOSSES: dict[str, Loss] = {
    # original minimax: G minimises log(1 - D(G(z))) = -softplus(score); saturates when D wins
    "minimax": Loss(_bce_d, lambda f: -F.softplus(f).mean(), False),
    # non-saturating: G minimises -log D(G(z))
    "nonsaturating": Loss(_bce_d, lambda f: F.softplus(-f).mean(), False),
    "wgan": Loss(_wgan_d, lambda f: -f.mean(), True),
    "wgan-gp": Loss(_wgan_d, lambda f: -f.mean(), True),
    "lsgan": Loss(
        lambda r, f: 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f**2).mean(),
        lambda f: 0.5 * ((f - 1) ** 2).mean(),
        False,
    ),
    "hinge": Loss(lambda r, f: F.relu(1 - r).mean() + F.relu(1 + f).mean(), lambda f: -f.mean(), True),
}


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
