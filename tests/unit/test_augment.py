"""pipeline.core.augment: ADA's augmentations (probability, symmetry, gradients) and its p controller."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.core.augment import IMAGE_OPS, JITTER_STD, POINT_OPS, ada_adjust, augment, overfit_signal


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 64, shape=(3, 8, 8), seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *shape), generator=gen(seed)) * 2 - 1


def points(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, generator=gen(seed)) * 2


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).flatten(1).any(1)


CASES = [(images, op) for op in IMAGE_OPS] + [(points, op) for op in POINT_OPS]


# ---- p = 0, p = 1 ---------------------------------------------------------------------------


@pytest.mark.parametrize("x", [images(), images(shape=(1, 8, 6)), points(), torch.randn(16, 5)])
def test_p0_leaves_input_unchanged(x):
    assert torch.equal(augment(x, 0.0, gen()), x)


@pytest.mark.parametrize("make, op", CASES)
def test_p1_changes_every_sample_for_each_op(make, op):
    x = make()
    assert changed(augment(x, 1.0, gen(), ops=[op]), x).all()


@pytest.mark.parametrize("x", [images(), images(shape=(1, 16, 12)), points()])
def test_p1_all_ops_change_every_sample(x):
    assert changed(augment(x, 1.0, gen()), x).all()


# ---- each op does what it says at p = 1 -----------------------------------------------------


def test_flip_is_a_horizontal_mirror():
    x = images()
    assert torch.equal(augment(x, 1.0, gen(), ops=["flip"]), x.flip(3))


def test_rot90_is_a_nonzero_quarter_turn():
    x = images()
    y = augment(x, 1.0, gen(), ops=["rot90"])
    turns = torch.stack([torch.rot90(x, k, (2, 3)) for k in (1, 2, 3)])  # (3, N, C, H, W)
    which = [[torch.equal(y[i], turns[k, i]) for k in range(3)] for i in range(len(x))]
    assert all(sum(w) == 1 for w in which)
    assert {w.index(True) for w in which} == {0, 1, 2}  # all three angles occur


def test_translate_shifts_by_at_most_an_eighth_with_edge_padding():
    x = images(n=32, shape=(1, 16, 16))
    y = augment(x, 1.0, gen(), ops=["translate"])
    for i in range(len(x)):
        hits = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                rows = (torch.arange(16) - dy).clamp(0, 15)
                cols = (torch.arange(16) - dx).clamp(0, 15)
                if torch.equal(y[i], x[i][:, rows][:, :, cols]):
                    hits.append((dy, dx))
        assert len(hits) == 1 and hits[0] != (0, 0), (i, hits)


def test_colour_ops_have_their_form():
    x = images()
    b = augment(x, 1.0, gen(), ops=["brightness"]) - x  # one constant per sample
    assert torch.allclose(b, b[:, :1, :1, :1].expand_as(b), atol=1e-6)
    c = augment(x, 1.0, gen(), ops=["contrast"]) / x  # one factor per sample
    assert torch.allclose(c, c[:, :1, :1, :1].expand_as(c), atol=1e-4)
    s = augment(x, 1.0, gen(), ops=["saturation"])  # grey level kept, distance to it scaled
    assert torch.allclose(s.mean(1), x.mean(1), atol=1e-5)
    ratio = (s - s.mean(1, keepdim=True)) / (x - x.mean(1, keepdim=True))
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-3, atol=1e-3)


def test_cutout_zeroes_a_square_up_to_a_quarter_of_the_image():
    x = images(n=256, shape=(3, 16, 16)) + 3  # no zeros before
    zero = augment(x, 1.0, gen(), ops=["cutout"]) == 0
    assert (zero.all(1) == zero.any(1)).all()  # every channel of a pixel
    frac = zero[:, 0].flatten(1).float().mean(1)
    assert (frac > 0).all() and (frac <= 0.25).all()
    assert (frac == 0.25).float().mean() > 0.1  # centred well inside: a full 8x8 square


def test_point_rotation_keeps_norms_and_is_small():
    x = points(n=2000)
    y = augment(x, 1.0, gen(), ops=["rotate"])
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    angle = torch.atan2(y[:, 1], y[:, 0]) - torch.atan2(x[:, 1], x[:, 0])
    angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    assert math.degrees(float(angle.std())) == pytest.approx(5.0, rel=0.1)


def test_point_jitter_has_the_documented_scale():
    x = points(n=4000)
    noise = augment(x, 1.0, gen(), ops=["jitter"]) - x
    assert float(noise.std()) == pytest.approx(JITTER_STD, rel=0.05)


# ---- 0 < p < 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("make, op", CASES)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_fraction_changed_is_p(make, op, p):
    n = 4000
    x = make(n=n)
    rate = float(changed(augment(x, p, gen(3), ops=[op]), x).float().mean())
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_all_ops_together_change_one_minus_q_to_the_k():
    # seven independent ops on 3-channel square images: a sample is untouched with prob (1-p)^7
    n, p = 4000, 0.1
    x = images(n=n)
    rate = float(changed(augment(x, p, gen(4)), x).float().mean())
    want = 1 - (1 - p) ** len(IMAGE_OPS)
    assert abs(rate - want) < 4 * math.sqrt(want * (1 - want) / n)


# ---- reals and fakes see the same distribution ----------------------------------------------


@pytest.mark.parametrize("make", [images, points])
def test_same_seed_same_input_same_output(make):
    x = make()
    assert torch.equal(augment(x, 0.5, gen(7)), augment(x, 0.5, gen(7)))
    assert not torch.equal(augment(x, 0.5, gen(7)), augment(x, 0.5, gen(8)))


@pytest.mark.parametrize("make", [images, points])
def test_reals_and_fakes_are_augmented_alike(make):
    # the draws depend on the shape only, not on the values: two different batches under the same
    # seed get the same transforms; under their own seeds, the same change rate
    n, p = 4000, 0.3
    real, fake = make(n=n, seed=1), make(n=n, seed=2) * 0.5 + 0.1
    for op in IMAGE_OPS if real.dim() == 4 else POINT_OPS:
        same_r, same_f = changed(augment(real, p, gen(5), [op]), real), changed(augment(fake, p, gen(5), [op]), fake)
        assert torch.equal(same_r, same_f), op
        rate_r = changed(augment(real, p, gen(5), [op]), real).float().mean()
        rate_f = changed(augment(fake, p, gen(6), [op]), fake).float().mean()
        assert abs(float(rate_r - rate_f)) < 4 * math.sqrt(2 * p * (1 - p) / n), op


def test_flip_applied_to_reals_equals_flip_applied_to_fakes():
    real, fake = images(seed=1), images(seed=2)
    both = augment(torch.cat([real, fake]), 1.0, gen(), ops=["flip"])
    assert torch.equal(both, torch.cat([real.flip(3), fake.flip(3)]))


def test_draws_do_not_depend_on_p():
    # one stream for all p: what is changed at a small p is also changed at a larger p
    x = images(n=500)
    low, high = changed(augment(x, 0.2, gen(9)), x), changed(augment(x, 0.5, gen(9)), x)
    assert low.sum() < high.sum() and (high | ~low).all()


# ---- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [images, points])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_gradients_flow_to_the_input(make, p):
    x = make().requires_grad_(True)
    y = augment(x, p, gen())
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # for every sample


@pytest.mark.parametrize("make, op", CASES)
def test_gradient_is_exact(make, op):
    x = make(n=3).double()
    if x.dim() == 4:
        x = x[:, :, :4, :4].contiguous()  # gradcheck costs one forward pass per input value
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: augment(t, 1.0, gen(), ops=[op]), (x,))


# ---- contract errors ------------------------------------------------------------------------


def test_bad_shapes_and_ops_are_rejected():
    with pytest.raises(ValueError, match="rot90"):
        augment(images(shape=(3, 8, 6)), 0.5, gen(), ops=["rot90"])
    with pytest.raises(ValueError, match="saturation"):
        augment(images(shape=(1, 8, 8)), 0.5, gen(), ops=["saturation"])
    with pytest.raises(ValueError, match="shape"):
        augment(torch.zeros(2, 3, 4), 0.5, gen())


# ---- the p controller -----------------------------------------------------------------------


def test_ada_adjust_direction_and_step():
    kw = dict(target=0.6, batch_size=64, interval=4, speed_img=500_000)
    step = 64 * 4 / 500_000
    assert ada_adjust(0.3, 0.9, **kw) == pytest.approx(0.3 + step)  # D overfits: more augmentation
    assert ada_adjust(0.3, 0.1, **kw) == pytest.approx(0.3 - step)
    assert ada_adjust(0.3, 0.6, **kw) == 0.3


def test_ada_adjust_stays_in_unit_interval():
    kw = dict(target=0.6, batch_size=1000, interval=10, speed_img=5000)  # steps of 2
    assert ada_adjust(0.5, 1.0, **kw) == 1.0
    assert ada_adjust(0.5, -1.0, **kw) == 0.0
    assert ada_adjust(1.0, 1.0, **kw) == 1.0 and ada_adjust(0.0, -1.0, **kw) == 0.0


def test_ada_adjust_crosses_unit_interval_in_speed_img_images():
    batch, interval, speed = 32, 4, 12_800  # 100 updates of 128 images
    p, seen = 0.0, 0
    while p < 1.0:
        p = ada_adjust(p, 1.0, 0.6, batch, interval, speed)
        seen += batch * interval
    assert seen == pytest.approx(speed, rel=0.02)  # up to float rounding of the last step
    for _ in range(100):
        p = ada_adjust(p, 0.0, 0.6, batch, interval, speed)
    assert p == pytest.approx(0.0, abs=1e-9)


def test_overfit_signal_is_the_mean_sign_of_real_scores():
    s = torch.tensor([2.0, -1.0, 3.0, 0.5], requires_grad=True)
    r = overfit_signal(s)
    assert float(r) == pytest.approx(0.5) and r.dim() == 0 and not r.requires_grad
    assert float(overfit_signal(torch.full((8,), 5.0))) == 1.0
    assert float(overfit_signal(torch.tensor([1.0, -1.0, 0.0, 0.0]))) == 0.0


@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (8, 2)])
def test_two_shards_augment_exactly_like_the_whole_batch(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    whole = augment(x, 0.5, torch.Generator().manual_seed(7))
    halves = [augment(x[r * 4 : (r + 1) * 4], 0.5, torch.Generator().manual_seed(7), shard=(r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
