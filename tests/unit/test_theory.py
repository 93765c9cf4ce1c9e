"""GAN theory with known answers, checked against the project's losses, models and loop.

Goodfellow et al. 2014 (optimal D, the value -log 4, saturation), Arjovsky et al. 2017 (weight
clipping), Gulrajani et al. 2017 (WGAN-GP), Miyato et al. 2018 (spectral norm), Mescheder et al.
2017 / Gidel et al. 2019 (the bilinear game). Measured numbers are printed (`pytest -s`).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core.config import build_config
from pipeline.core.losses import LOSSES, gradient_penalty
from pipeline.core.models import DCGANDiscriminator, MLPDiscriminator
from pipeline.core.training import GAN, Batches, Hooks, d_step, no_sync, train


def normal_pdf(x: torch.Tensor, mean: float | torch.Tensor = 0.0, std: float | torch.Tensor = 1.0) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


# ---- 1. the optimal discriminator and the value of the game ---------------------------------


def fit_discriminator(real: torch.Tensor, fake: torch.Tensor, steps: int = 500) -> nn.Module:
    """Full-batch Adam on the BCE discriminator loss."""
    D = MLPDiscriminator(1, 32, 2, "none", "leaky_relu")
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = LOSSES["nonsaturating"].d(D(real), D(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return D


def test_trained_discriminator_is_the_optimal_one():
    # D*(x) = p_data / (p_data + p_g); for N(0, 1) against N(2, 1) that is sigmoid(2 - 2x)
    torch.manual_seed(0)
    real, fake = torch.randn(4096, 1), torch.randn(4096, 1) + 2
    D = fit_discriminator(real, fake)
    x = torch.linspace(-1, 3, 401)
    with torch.no_grad():
        d = torch.sigmoid(D(x[:, None]))
    p_data, p_g = normal_pdf(x), normal_pdf(x, 2.0)
    err = float((d - p_data / (p_data + p_g)).abs().max())
    print(f"optimal D: max |sigmoid(D(x)) - D*(x)| on [-1, 3] = {err:.4f}")
    assert err < 0.05


def test_value_of_the_game_at_equilibrium_is_minus_log_4():
    # V(D, G) = E log D(x) + E log(1 - D(G(z))) = -(BCE loss of D); at D = 1/2 it is -log 4
    zeros = torch.zeros(16)
    assert float(-LOSSES["minimax"].d(zeros, zeros)) == pytest.approx(-math.log(4), rel=1e-6)
    # and a D trained on p_g = p_data can do no better than 1/2
    torch.manual_seed(1)
    D = fit_discriminator(torch.randn(4096, 1), torch.randn(4096, 1))
    with torch.no_grad():
        v = float(-LOSSES["minimax"].d(D(torch.randn(8192, 1)), D(torch.randn(8192, 1))))
    print(f"value at p_g = p_data: {v:.4f} (-log 4 = {-math.log(4):.4f})")
    assert abs(v + math.log(4)) < 0.02


# ---- 2. the minimax generator loss saturates ------------------------------------------------


def test_minimax_generator_gradient_vanishes_where_nonsaturating_does_not():
    grads = {}
    for name in ("minimax", "nonsaturating"):
        score = torch.full((8,), -8.0, requires_grad=True)  # D(G(z)) = sigmoid(-8), about 3e-4
        LOSSES[name].g(score).backward()
        assert (score.grad < 0).all()  # both push the score up, towards fooling D
        grads[name] = float(score.grad.abs().mean())
    ratio = grads["nonsaturating"] / grads["minimax"]
    print(f"|dL_G/ds| nonsaturating / minimax at s = -8: {ratio:.1f} (e^8 = {math.exp(8):.1f})")
    assert ratio > 1000
    assert ratio == pytest.approx(math.exp(8), rel=1e-4)  # sigmoid(8) / sigmoid(-8)


# ---- 3. weight clipping biases the critic ---------------------------------------------------


class Constant(nn.Module):
    """A 'generator' with one scalar parameter x: every sample is x, shape (N, 1)."""

    def __init__(self, x: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x, dtype=dtype))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.x.expand(z.shape[0], 1)


def scalar_gan(x: float, y: float, lr: float, real: float, dtype: torch.dtype = torch.float32) -> tuple[GAN, Batches]:
    """G = Constant(x), D(v) = y * v (a linear critic), both under plain SGD; all reals equal `real`."""
    G, D = Constant(x, dtype), nn.Linear(1, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        D.weight.fill_(y)
    gan = GAN(G, D, None, torch.optim.SGD(G.parameters(), lr=lr), torch.optim.SGD(D.parameters(), lr=lr), {})
    return gan, Batches(torch.full((16, 1), real, dtype=dtype), 16, 1, seed=0)


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_weight_clipping_pins_the_critic_and_scales_its_estimate(c):
    # reals a Dirac at +a, fakes at -a: W1 = 2a. The critic f(v) = w v maximises 2aw, so gradient
    # ascent then clipping ends at w = c and estimates 2ac: W1 times c, exact only for c = 1.
    a = 3.0
    cfg = build_config({"loss": {"name": "wgan", "clip": c, "r1_gamma": 0.0}, "train": {"batch_size": 16}})
    gan, batches = scalar_gan(-a, 0.0, lr=0.1, real=a)
    for step in range(20):
        d_step(gan, cfg, batches, step, 0, no_sync)
    w = gan.D.weight.item()
    with torch.no_grad():
        estimate = float(gan.D(batches.reals(99, 0)).mean() - gan.D(gan.G(batches.latents(99, 1))).mean())
    print(f"weight clipping c = {c}: w = {w}, estimate = {estimate:.4f}, W1 = {2 * a}")
    assert w == pytest.approx(c, rel=1e-6)
    assert estimate == pytest.approx(2 * a * c, rel=1e-5)


# ---- 4. WGAN-GP: the soft penalty's known bias ----------------------------------------------


def soft_penalty_optimum(mu: float, lam: float) -> float:
    """The critic's estimate at the optimum of the WGAN-GP objective, N(0, 1) against N(mu, 1).

    Along the mean difference, E_P f - E_Q f = int f'(x) h(x) dx with h = F_P - F_Q, and the penalty
    is lam * int (|f'| - 1)^2 rho with rho the density of the interpolates; the objective is
    maximised pointwise by f' = 1 + h / (2 lam rho). So the estimate is W1 + int h^2 / (2 lam rho),
    above W1, and the mean gradient norm on interpolates is exactly 1 + W1 / (2 lam).
    """
    x = torch.linspace(-10, mu + 10, 4001, dtype=torch.float64)
    eps = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]  # x_hat | eps is Gaussian
    rho = torch.trapezoid(normal_pdf(x, (1 - eps) * mu, torch.sqrt(eps**2 + (1 - eps) ** 2)), eps[:, 0], dim=0)
    h = torch.special.ndtr(x) - torch.special.ndtr(x - mu)
    return float(torch.trapezoid((1 + h / (2 * lam * rho)) * h, x))


def fit_wgan_gp_critic(mu: float, lam: float = 10.0, steps: int = 800, n: int = 512) -> tuple[float, float]:
    """Train a 2D critic on N(0, I) against N((mu, 0), I); return (estimate, mean grad norm)."""
    shift = torch.tensor([mu, 0.0])
    D = MLPDiscriminator(2, 64, 2, "none", "leaky_relu")
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for step in range(steps):
        if step == int(0.6 * steps):  # settle: less SGD noise in the final critic
            opt.param_groups[0]["lr"] = 1e-4
        real, fake, eps = torch.randn(n, 2), torch.randn(n, 2) + shift, torch.rand(n)
        loss = LOSSES["wgan-gp"].d(D(real), D(fake)) + lam * gradient_penalty(D, real, fake, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake, eps = torch.randn(50_000, 2), torch.randn(50_000, 2) + shift, torch.rand(50_000, 1)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat)
    with torch.no_grad():
        estimate = float(D(real).mean() - D(fake).mean())
    return estimate, float(grad.norm(dim=1).mean())


@pytest.mark.parametrize("mu", [1.0, 3.0])
def test_wgan_gp_critic_estimates_w1_with_the_soft_penalty_bias(mu):
    # 2D, not 1D: in 1D a critic that starts with the wrong slope sign is stuck in a local optimum
    # (slope 1 - W1 / (2 lam)), since turning around means crossing |f'| = 0, a penalty barrier of lam
    torch.manual_seed(0)
    lam, w1 = 10.0, mu  # W1 between equal-covariance Gaussians: the distance of their means
    estimate, grad_norm = fit_wgan_gp_critic(mu, lam)
    optimum = soft_penalty_optimum(mu, lam)
    print(
        f"WGAN-GP mu = {mu}: estimate {estimate:.4f}, penalised optimum {optimum:.4f}, W1 {w1}; "
        f"grad norm {grad_norm:.4f}, predicted {1 + w1 / (2 * lam):.4f}"
    )
    assert grad_norm == pytest.approx(1 + w1 / (2 * lam), abs=0.025)
    assert estimate == pytest.approx(optimum, rel=0.03)
    if w1 / (2 * lam) < 0.1:  # the bias stays under 10% (and the norm within 0.1 of 1) for small W1
        assert abs(estimate - w1) < 0.1 * w1 and abs(grad_norm - 1) < 0.1


# ---- 5. spectral normalisation --------------------------------------------------------------


def test_spectral_norm_makes_the_mlp_discriminator_1_lipschitz():
    # every layer at spectral norm 1 and leaky_relu 1-Lipschitz: D is 1-Lipschitz, so even a critic
    # trained to separate N(0, I) from N((3, 0), I) (unbounded without the norm) estimates <= W1 = 3
    torch.manual_seed(0)
    D = MLPDiscriminator(2, 64, 3, "spectral", "leaky_relu", pack=1)
    layers = [m for m in D.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 4 and all(hasattr(m, "parametrizations") for m in layers)
    shift = torch.tensor([3.0, 0.0])
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    D.train()
    for _ in range(300):
        loss = LOSSES["wgan"].d(D(torch.randn(256, 2)), D(torch.randn(256, 2) + shift))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for _ in range(50):  # one power iteration per forward pass in train mode
            D(torch.randn(32, 2))
    D.eval()
    sigmas = [float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) for m in layers]
    a, b = torch.randn(20_000, 2) * 3, torch.randn(20_000, 2) * 3
    near = a + 1e-2 * torch.randn(20_000, 2)  # close pairs probe the local slope
    with torch.no_grad():
        lip = max(
            float(((D(a) - D(b)).abs() / (a - b).norm(dim=1)).max()),
            float(((D(a) - D(near)).abs() / (a - near).norm(dim=1)).max()),
        )
        estimate = float(D(torch.randn(20_000, 2)).mean() - D(torch.randn(20_000, 2) + shift).mean())
    print(
        f"spectral norm: sigma of each layer {[round(s, 5) for s in sigmas]}; "
        f"empirical Lipschitz {lip:.4f}; critic estimate {estimate:.4f} <= W1 = 3"
    )
    assert all(abs(s - 1) < 1e-2 for s in sigmas)
    assert lip <= 1 + 1e-2
    assert estimate <= 3 + 0.03  # Kantorovich-Rubinstein, up to the sampling error of the means


# ---- 6. batch norm couples the samples of a batch -------------------------------------------


def discriminators(norm: str) -> list[nn.Module]:
    out = [MLPDiscriminator(2, 16, 3, norm, "leaky_relu")] if norm != "instance" else []
    return out + [DCGANDiscriminator((3, 16, 16), 8, norm, "leaky_relu")]  # 16x16: two levels, one norm


@pytest.mark.parametrize("norm", ["batch", "layer", "none", "instance"])
def test_only_batch_norm_lets_other_samples_change_a_score(norm):
    torch.manual_seed(0)
    for D in discriminators(norm):
        D.train()
        shape = (8, 2) if isinstance(D, MLPDiscriminator) else (8, 3, 16, 16)
        x = torch.randn(shape)
        other = torch.cat([x[:1], torch.randn(shape)[1:]])  # same sample 0, new companions
        with torch.no_grad():
            same = torch.allclose(D(x)[0], D(other)[0], atol=1e-6)
        assert same == (norm != "batch"), (type(D).__name__, norm)


# ---- 7. the bilinear game through the training loop -----------------------------------------


def bilinear_radii(update: str, lr: float, steps: int) -> list[float]:
    """Run `train` on the game x * y and return the radius sqrt(x^2 + y^2) after every step.

    Reals are all 0 and fakes all x, so the critic f(v) = y v has WGAN loss y x - y 0 = x y (D
    descends on y) and G's loss is -x y (G ascends on x): exactly the bilinear game. 'wgan-gp' with
    gp_weight 0 is the only loss that is bilinear here: the penalty is still computed but enters with
    weight 0 (y never hits 0, where the norm's gradient is undefined); 'wgan' would clip y to
    loss.clip, and 'hinge' has kinks.
    """
    cfg = build_config(
        {
            "loss": {"name": "wgan-gp", "gp_weight": 0.0, "r1_gamma": 0.0},
            "model": {"arch": "mlp"},
            "train": {"update": update, "steps": steps, "batch_size": 16, "log_every": 1, "checkpoint_every": 10**6},
        }
    )
    gan, batches = scalar_gan(1.0, 0.5, lr=lr, real=0.0, dtype=torch.float64)
    radius = lambda: math.hypot(gan.G.x.item(), gan.D.weight.item())
    radii = [radius()]
    train(gan, cfg, batches, Hooks(on_log=lambda step, stats: radii.append(radius())))
    assert len(radii) == steps + 1
    return radii


def test_simultaneous_gradient_descent_ascent_spirals_out():
    lr = 0.1
    r = bilinear_radii("simultaneous", lr, 50)
    ratios = [b / a for a, b in zip(r[:-1], r[1:])]
    print(
        f"bilinear simultaneous: radius ratio per step {min(ratios):.9f}..{max(ratios):.9f} "
        f"(sqrt(1 + lr^2) = {math.sqrt(1 + lr**2):.9f}), r_50 / r_0 = {r[-1] / r[0]:.4f}"
    )
    assert all(q == pytest.approx(math.sqrt(1 + lr**2), abs=1e-9) for q in ratios)


def test_alternating_updates_stay_bounded():
    # alternating is a symplectic map (determinant 1): it conserves x^2 + y^2 - lr x y, so the
    # radius oscillates within a factor sqrt((1 + lr / 2) / (1 - lr / 2)), the ellipse's axis ratio
    lr = 0.1
    r = bilinear_radii("alternating", lr, 1000)
    spread = max(r) / min(r)
    print(f"bilinear alternating: max / min radius over 1000 steps {spread:.4f}, r_1000 / r_0 = {r[-1] / r[0]:.4f}")
    assert spread <= math.sqrt((1 + lr / 2) / (1 - lr / 2)) + 1e-9
    assert max(r) / r[0] < 1.2
