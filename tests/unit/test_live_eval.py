"""In-training evaluation (eval.every): when it runs, what it records, that it leaves training
untouched, and that its numbers are the metrics' known answers on known generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core import data as D
from pipeline.core import features, live_eval, metrics2d
from pipeline.core.config import build_config
from pipeline.core.training import Batches, Hooks, build_gan, gan_state, load_gan_state, train
from tests.unit.test_training import tiny


@pytest.fixture(scope="module")
def grid():
    cfg = tiny()
    return D.prepare(cfg.data, cfg.seed)


class Mixture(torch.nn.Module):
    """A 'generator' that returns exact draws of the grid mixture: a random centre + Gaussian noise."""

    def __init__(self, centers: np.ndarray, std: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(centers, dtype=torch.float32), requires_grad=False)
        self.std = std

    def forward(self, z):
        g = torch.Generator().manual_seed(int(z.abs().sum() * 1000) % 2**31)
        idx = torch.randint(len(self.c), (len(z),), generator=g)
        return self.c[idx] + self.std * torch.randn(len(z), 2, generator=g)


class Constant(torch.nn.Module):
    def __init__(self, point):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(point, dtype=torch.float32))

    def forward(self, z):
        return self.p.expand(len(z), -1)


def _train(cfg, p, hooks):
    gan = build_gan(cfg, list(p.x_train.shape[1:]))
    return train(gan, cfg, Batches(torch.from_numpy(p.x_train), 32, cfg.model.z_dim, cfg.seed), hooks)


def test_eval_runs_every_n_steps_and_at_the_end(grid):
    cfg = tiny(eval={"every": 7})
    seen = []
    gan = _train(cfg, grid, Hooks(on_eval=lambda g: seen.append(g.step) or {"x": float(g.step)}))
    assert seen == [7, 14, 21, 28, 30]
    assert [r["step"] for r in gan.evals] == seen and [r["x"] for r in gan.evals] == seen


def test_eval_off_calls_nothing(grid):
    seen = []
    gan = _train(tiny(eval={"every": 0}), grid, Hooks(on_eval=lambda g: seen.append(g.step) or {"x": 1.0}))
    assert seen == [] and gan.evals == []


def test_evaluation_does_not_change_training(grid):
    """Live evaluation samples G in eval mode with its own RNG: the trained weights are bit-identical."""
    live = live_eval.LiveEval(grid.x_val, "grid", 200, 0)
    cfg_on, cfg_off = (
        tiny(eval={"every": 5}, model={"hidden": 16, "d_norm": "batch"}),
        tiny(model={"hidden": 16, "d_norm": "batch"}),
    )
    on = _train(cfg_on, grid, Hooks(on_eval=lambda g: live(g.G, 2)))
    off = _train(cfg_off, grid, Hooks())
    assert [r["step"] for r in on.evals] == [5, 10, 15, 20, 25, 30]
    for a, b in zip(on.G.state_dict().values(), off.G.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(on.D.state_dict().values(), off.D.state_dict().values()):
        assert torch.equal(a, b)


def test_evals_survive_a_checkpoint_round_trip(grid):
    cfg = tiny(eval={"every": 10})
    gan = _train(cfg, grid, Hooks(on_eval=lambda g: {"m": g.step / 10}))
    again = build_gan(cfg, [2])
    load_gan_state(again, gan_state(gan), cfg)
    assert again.evals == gan.evals == [{"step": 10, "m": 1.0}, {"step": 20, "m": 2.0}, {"step": 30, "m": 3.0}]


def test_2d_live_metrics_have_the_known_answers(grid):
    """A generator drawing from the true mixture captures all 25 modes at ~99% high quality and small
    W1; a generator stuck on one point captures 1 mode, and its W1 is the exact transport cost."""
    mix = D.mixture("grid")
    live = live_eval.LiveEval(grid.x_val, "grid", 200, 0)
    good = live(Mixture(mix.centers, mix.std), 2)
    floor = metrics2d.w1(grid.x_train[:200], grid.x_val[:200])  # two real sets of the same size
    assert good["modes"] == 25 and good["hq_fraction"] > 0.95 and good["w1"] < 1.5 * floor
    stuck = live(Constant([0.0, 0.0]), 2)
    real = grid.x_val[:200]
    assert stuck["modes"] == 1
    assert stuck["w1"] == pytest.approx(np.linalg.norm(real, axis=1).mean(), rel=1e-6)
    assert stuck["w1"] == pytest.approx(metrics2d.w1(np.zeros((200, 2)), real), rel=1e-9)


@pytest.fixture(scope="module")
def digits():
    cfg = build_config({"data": {"name": "digits"}, "model": {"arch": "dcgan"}})
    p = D.prepare(cfg.data, 0)
    model, info = features.train_extractor(p.x_train, p.y_train, 10, seed=0, x_val=p.x_val, y_val=p.y_val)
    return p, model


class Replay(torch.nn.Module):
    """A 'generator' returning fixed images (z only sets how many)."""

    def __init__(self, images: np.ndarray):
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor(images), requires_grad=False)

    def forward(self, z, y=None):
        idx = torch.arange(len(z)) % len(self.x) if y is None else self._by_label(y)
        return self.x[idx]

    labels: torch.Tensor | None = None

    def _by_label(self, y):
        pools = [torch.nonzero(self.labels == c).flatten() for c in range(10)]
        return torch.stack([pools[int(c)][i % len(pools[int(c)])] for i, c in enumerate(y)])


def test_image_live_metrics_separate_real_images_from_a_single_class(digits):
    p, model = digits
    live = live_eval.LiveEval(p.x_val, "digits", 300, 0, model, classifier=True)
    real = live(Replay(p.x_train), 8)
    ones = live(Replay(p.x_train[p.y_train == 1]), 8)
    assert real["class_modes"] == 10 and real["class_kl"] < 0.1
    assert ones["class_modes"] == 1 and ones["class_kl"] > 1.5  # log(10) = 2.30 for one class
    assert ones["fid"] > 5 * real["fid"]


def test_conditional_live_eval_reports_label_accuracy(digits):
    p, model = digits
    g = Replay(p.x_train)
    g.labels = torch.tensor(p.y_train)
    live = live_eval.LiveEval(p.x_val, "digits", 200, 0, model, classifier=True, conditional_classes=10)
    right = live(g, 8)
    assert right["label_accuracy"] > 0.9
    g.labels = torch.tensor((p.y_train + 1) % 10)  # every label shifted: G(z, y) draws class y + 1
    assert live(g, 8)["label_accuracy"] < 0.1


def test_recall_exposes_a_conditional_generator_that_ignores_z(digits):
    """One image per class: right classes, right labels, right class balance, and recall near 0."""
    p, model = digits
    live = live_eval.LiveEval(p.x_val, "digits", 300, 0, model, classifier=True, conditional_classes=10)
    diverse = Replay(p.x_train)
    diverse.labels = torch.tensor(p.y_train)
    first = [int(np.flatnonzero(p.y_train == c)[0]) for c in range(10)]
    collapsed = Replay(p.x_train[first])
    collapsed.labels = torch.arange(10)
    good, bad = live(diverse, 8), live(collapsed, 8)
    assert bad["class_modes"] == 10 and bad["class_kl"] < 0.1 and bad["label_accuracy"] > 0.9
    assert good["recall"] > 0.5 and bad["recall"] < 0.1
    assert good["precision"] > 0.5


def test_random_extractor_reports_only_fid(digits):
    p, _ = digits
    rand, _ = features.random_extractor(p.x_train.shape[1:], 0)
    out = live_eval.LiveEval(p.x_val, "digits", 200, 0, rand, classifier=False)(Replay(p.x_train), 8)
    assert set(out) == {"fid"}


def test_image_data_without_an_extractor_is_refused_with_the_folder_named(tmp_path):
    cfg = build_config({"data": {"name": "digits"}, "model": {"arch": "dcgan"}, "eval": {"every": 10}})
    p = D.prepare(cfg.data, 0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        live_eval.from_prepared(cfg, p, tmp_path / "nothing")
