"""pipeline.core.losses: known values of the GAN losses and penalties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core.losses import LOSSES, gradient_penalty, r1_penalty

BIG = 30.0


def test_all_contract_losses_present():
    assert set(LOSSES) == {"minimax", "nonsaturating", "wgan", "wgan-gp", "lsgan", "hinge"}
    # critics report raw scores, the probabilistic losses sigmoid(score)
    assert {k for k, v in LOSSES.items() if not v.sigmoid_report} >= {"wgan", "wgan-gp"}
    assert LOSSES["nonsaturating"].sigmoid_report and LOSSES["minimax"].sigmoid_report


@pytest.mark.parametrize("name", ["nonsaturating", "minimax"])
def test_bce_d_loss_perfect_discriminator_is_zero(name):
    r, f = torch.full((8,), BIG), torch.full((8,), -BIG)
    assert float(LOSSES[name].d(r, f)) < 1e-10


@pytest.mark.parametrize("name", ["nonsaturating", "minimax"])
def test_bce_d_loss_matches_definition(name):
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid(score), on moderate scores
    r, f = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([-0.5, 0.7, 1.5])
    want = -torch.log(torch.sigmoid(r)).mean() - torch.log(1 - torch.sigmoid(f)).mean()
    assert float(LOSSES[name].d(r, f)) == pytest.approx(float(want), rel=1e-6)
    # at D = 1/2 everywhere: 2 log 2
    assert float(LOSSES[name].d(torch.zeros(4), torch.zeros(4))) == pytest.approx(2 * math.log(2), rel=1e-6)


def test_bce_d_loss_stable_for_huge_scores():
    d = LOSSES["nonsaturating"].d(torch.tensor([-1e4]), torch.tensor([1e4]))
    assert torch.isfinite(d) and float(d) == pytest.approx(2e4)


def test_generator_losses_known_values():
    f = torch.tensor([0.0])
    assert float(LOSSES["nonsaturating"].g(f)) == pytest.approx(math.log(2))  # -log(1/2)
    assert float(LOSSES["minimax"].g(f)) == pytest.approx(-math.log(2))  # log(1 - 1/2)
    assert float(LOSSES["lsgan"].g(torch.ones(3))) == 0.0
    assert float(LOSSES["wgan"].g(torch.tensor([2.0, 4.0]))) == -3.0


def test_wgan_hinge_lsgan_d_losses():
    r, f = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, 1.0])
    assert float(LOSSES["wgan"].d(r, f)) == pytest.approx(0.0 - 3.0)
    assert float(LOSSES["wgan-gp"].d(r, f)) == pytest.approx(-3.0)
    # hinge: relu(1 - r) = 0, 0; relu(1 + f) = 0, 2 -> 0 + 1
    assert float(LOSSES["hinge"].d(r, f)) == pytest.approx(1.0)
    assert float(LOSSES["lsgan"].d(torch.ones(2), torch.zeros(2))) == 0.0


def test_minimax_generator_saturates():
    grads = {}
    for name in ("minimax", "nonsaturating"):
        s = torch.tensor([-10.0], requires_grad=True)
        LOSSES[name].g(s).backward()
        grads[name] = abs(float(s.grad))
    assert grads["nonsaturating"] > 0.99  # ~ sigmoid(10)
    assert grads["minimax"] < 1e-4  # ~ sigmoid(-10) = 4.5e-5
    assert grads["nonsaturating"] / grads["minimax"] > 1000
    # both push the score up (gradient descent on the loss increases s)
    for name in ("minimax", "nonsaturating"):
        s = torch.tensor([-10.0], requires_grad=True)
        LOSSES[name].g(s).backward()
        assert float(s.grad) < 0


# ---- penalties -------------------------------------------------------------------------------


def _linear_critic(w: list[float], bias: float = 0.7) -> nn.Linear:
    lin = nn.Linear(len(w), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.fill_(bias)
    return lin


def _points(n=16, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize("w, want", [([0.6, 0.0, 0.8], 0.0), ([1.8, 0.0, 2.4], 4.0), ([0.0, 0.5, 0.0], 0.25)])
def test_gradient_penalty_linear_critic(w, want):
    real, fake, eps = _points()
    gp = gradient_penalty(_linear_critic(w), real, fake, eps)
    assert float(gp.detach()) == pytest.approx(want, abs=1e-5)


def test_gradient_penalty_flows_back_to_critic():
    # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|: with |w| = 3 along x -> (4, 0, 0)
    D = _linear_critic([3.0, 0.0, 0.0])
    real, fake, eps = _points()
    gradient_penalty(D, real, fake, eps).backward()
    assert torch.allclose(D.weight.grad, torch.tensor([[4.0, 0.0, 0.0]]), atol=1e-5)


def test_gradient_penalty_uses_interpolates():
    # f(x) = |x|^2 / 2 has gradient x: the penalty sees eps*real + (1-eps)*fake, nothing else
    class Quad(nn.Module):
        def forward(self, x):
            return 0.5 * x.pow(2).flatten(1).sum(1)

    real, fake, eps = _points(n=8, d=2)
    x_hat = eps[:, None] * real + (1 - eps[:, None]) * fake
    want = ((x_hat.norm(dim=1) - 1) ** 2).mean()
    assert float(gradient_penalty(Quad(), real, fake, eps).detach()) == pytest.approx(float(want), rel=1e-5)


def test_gradient_penalty_images():
    # per-sample norms over (C, H, W): a linear critic on flattened 1x2x2 images with |w| = 2
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = _linear_critic([1.0, 1.0, 1.0, 1.0])

        def forward(self, x):
            return self.lin(x.flatten(1)).squeeze(1)

    g = torch.Generator().manual_seed(1)
    real, fake, eps = torch.randn(5, 1, 2, 2, generator=g), torch.randn(5, 1, 2, 2, generator=g), torch.rand(5)
    assert float(gradient_penalty(Flat(), real, fake, eps).detach()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("w", [[1.0, 0.0, 0.0], [1.0, 2.0, -2.0], [0.1, 0.2, 0.3]])
def test_r1_penalty_linear_critic(w):
    real, _, _ = _points()
    want = sum(v * v for v in w)
    assert float(r1_penalty(_linear_critic(w), real).detach()) == pytest.approx(want, rel=1e-5)


def test_r1_penalty_flows_back_to_critic():
    D = _linear_critic([1.0, 2.0, -2.0])
    real, _, _ = _points()
    r1_penalty(D, real).backward()
    assert torch.allclose(D.weight.grad, 2 * D.weight.detach(), atol=1e-5)  # d|w|^2/dw = 2w
