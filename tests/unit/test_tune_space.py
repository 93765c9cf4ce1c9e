"""The search space is refused before anything starts, each problem naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, read_yaml
from pipeline.tune import best_row, parse_space

BASE = read_yaml(Path(__file__).resolve().parents[2] / "params.yaml")


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "tune.search_space: empty"),
        ({"train.lr_x": {"uniform": [0.1, 0.2]}}, "tune.search_space.train.lr_x: unknown params key"),
        ({"train.lr_g": {"normal": [0, 1]}}, "tune.search_space.train.lr_g: must be one of"),
        ({"train.lr_g": {"uniform": [0.2, 0.1]}}, "tune.search_space.train.lr_g: uniform range is empty"),
        ({"train.lr_g": {"loguniform": [0.0, 0.1]}}, "tune.search_space.train.lr_g: loguniform needs low > 0"),
        ({"train.n_critic": {"randint": [1.5, 4]}}, "tune.search_space.train.n_critic: randint needs integers"),
        ({"train.lr_g": {"uniform": [-1.0, 0.1]}}, "tune.search_space.train.lr_g: value -1.0 gives an invalid config"),
        ({"loss.name": {"choice": ["hinge", "hinj"]}}, "tune.search_space.loss.name: value 'hinj' gives an invalid"),
        ({"model.hidden": {"choice": []}}, "tune.search_space.model.hidden: choice needs a non-empty list"),
    ],
)
def test_bad_spaces_name_the_key(space, message):
    with pytest.raises(ConfigError) as e:
        parse_space(space, BASE)
    assert message in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse_space({"a.b": {"uniform": [0, 1]}, "train.lr_g": {"uniform": [1, 0]}}, BASE)
    assert len(str(e.value).splitlines()) == 2


def test_a_good_space_parses():
    space = {
        "train.lr_g": {"loguniform": [1e-4, 1e-2]},
        "model.hidden": {"choice": [32, 64]},
        "train.n_critic": {"randint": [1, 3]},
        "loss.name": {"grid": ["nonsaturating", "hinge"]},
    }
    parsed = parse_space(space, BASE)
    assert parsed["train.lr_g"] == ("loguniform", [1e-4, 1e-2]) and parsed["loss.name"][0] == "grid"


def test_best_row_prefers_finished_trials_and_skips_failed():
    rows = [
        {"trial_id": "a", "status": "failed", "w1": 0.01},
        {"trial_id": "b", "status": "stopped_early", "w1": 0.1},
        {"trial_id": "c", "status": "finished", "w1": 0.5},
        {"trial_id": "d", "status": "finished", "w1": float("nan")},
    ]
    assert best_row(rows, "w1", "min")["trial_id"] == "c"
    assert best_row(rows[:2], "w1", "max")["trial_id"] == "b"


@pytest.mark.parametrize("steps, every", [(400, 1000), (10_000, 1000), (300, 100), (50, 50)])
def test_asha_rungs_fit_inside_the_run(steps: int, every: int):
    from pipeline.config import build_config
    from pipeline.tune import scheduler

    cfg = build_config({"train": {"steps": steps, "checkpoint_every": every}})
    # Ray refuses a grace period past max_t ("grace_period must be <= max_t!")
    asha = scheduler(cfg, parse_space(cfg.tune.search_space, cfg.to_dict()))
    assert asha._max_t == steps


def test_the_committed_params_have_a_search_space_that_parses():
    raw = read_yaml(Path(__file__).resolve().parents[2] / "params.yaml")
    assert set(parse_space(raw["tune"]["search_space"], raw)) == {"train.lr_g", "train.lr_d"}
