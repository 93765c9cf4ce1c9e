"""The search space is refused before anything starts, each problem naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, build_config, read_yaml
from pipeline.ray import tune
from pipeline.ray.tune import best_row, parse_space

ROOT = Path(__file__).resolve().parents[2]

BASE = read_yaml(Path(__file__).resolve().parents[2] / "params.yaml")


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "tune.search_space: empty"),
        ({"train.lr_x": {"uniform": [0.1, 0.2]}}, "tune.search_space.train.lr_x: unknown params key"),
        ({"tune.num_samples": {"randint": [1, 3]}}, "tune.search_space.tune.num_samples: not a key a trial's"),
        ({"tracking.uri": {"choice": ["http://u:p@h:1"]}}, "tune.search_space.tracking.uri: not a key a trial's"),
        ({"train.num_workers": {"choice": [1, 2]}}, "tune.search_space.train.num_workers: not a key a trial's"),
        ({"data.n_samples": {"choice": [100, 200]}}, "tune.search_space.data.n_samples: not a key a trial's"),
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


def test_best_row_never_picks_a_collapsed_or_diverged_trial_and_the_stopper_ends_them():
    from pipeline.ray.tune import stops_trial

    rows = [
        {"trial_id": "a", "status": "finished", "w1": 0.01, "diagnosis": "mode_collapse", "severe": "mode_collapse"},
        # the first problem was a warning; a divergence came later and stands
        {"trial_id": "b", "status": "finished", "w1": 0.02, "diagnosis": "oscillating", "severe": "diverged"},
        {"trial_id": "c", "status": "finished", "w1": 0.5, "diagnosis": "d_overfit", "severe": ""},  # not severe
        {"trial_id": "d", "status": "finished", "w1": 0.9, "diagnosis": "healthy", "severe": ""},
    ]
    assert best_row(rows, "w1", "min")["trial_id"] == "c"
    assert best_row(rows[:2], "w1", "min") is None
    assert [stops_trial(r) for r in rows] == [True, True, False, False]
    assert not stops_trial({"step": 100})


def test_severe_problems_are_the_standing_ones():
    from pipeline.core import monitor

    m = monitor.Monitor()
    m.record("oscillating", 100, {})
    m.record("diverged", 200, {})
    assert m.verdict == "oscillating" and m.severe == ["diverged"]
    m.rolled_back(200, 100, {})  # recovered: a rollback followed the divergence
    assert m.severe == [] and m.report()["severe"] == []
    m.record("mode_collapse", 400, {})
    assert m.severe == ["mode_collapse"]


@pytest.mark.parametrize("steps, every", [(400, 1000), (10_000, 1000), (300, 100), (50, 50)])
def test_asha_rungs_fit_inside_the_run(steps: int, every: int):
    from pipeline.core.config import build_config
    from pipeline.ray.tune import scheduler

    cfg = build_config({"train": {"steps": steps, "checkpoint_every": every}})
    # Ray refuses a grace period past max_t ("grace_period must be <= max_t!")
    asha = scheduler(cfg, parse_space(cfg.tune.search_space, cfg.to_dict()))
    assert asha._max_t == steps


def test_the_committed_params_have_a_search_space_that_parses():
    raw = read_yaml(Path(__file__).resolve().parents[2] / "params.yaml")
    assert set(parse_space(raw["tune"]["search_space"], raw)) == {"train.lr_g", "train.lr_d"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))
def test_every_preset_tunes_on_a_metric_its_trials_report(preset):
    from pipeline.core.config import deep_merge
    from pipeline.ray.tune import check_tunable

    check_tunable(build_config(deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / f"presets/{preset}.yaml"))))


@pytest.mark.parametrize(
    "over,gist",
    [
        ({"data": {"name": "digits"}, "model": {"arch": "dcgan"}}, "trials on digits (images) report fid"),
        ({"tune": {"metric": "fid"}}, "trials on grid (points) report w1, modes, hq_fraction, reverse_kl"),
        (
            {
                "tune": {"metric": "label_accuracy", "mode": "max"},
                "data": {"name": "mnist5k"},
                "model": {"arch": "dcgan"},
            },
            "report fid, precision, recall, class_modes, class_kl, loss/D",
        ),
    ],
)
def test_a_tune_metric_the_trials_never_report_is_refused_before_any_trial(over, gist):
    from pipeline.core.config import deep_merge
    from pipeline.ray.tune import check_tunable

    with pytest.raises(ConfigError) as e:
        check_tunable(build_config(deep_merge(read_yaml(ROOT / "params.yaml"), over)))
    assert str(e.value).startswith("tune.metric: ") and gist in str(e.value)


def test_an_npz_sweep_checks_its_metric_once_the_data_kind_is_known():
    from pipeline.core.config import deep_merge
    from pipeline.ray.tune import check_metric, check_tunable

    cfg = build_config(
        deep_merge(
            read_yaml(ROOT / "params.yaml"),
            {"data": {"name": "npz", "path": "x.npz"}, "tune": {"metric": "modes", "mode": "max"}},
        )
    )
    check_tunable(cfg)  # not known before prepare
    with pytest.raises(ConfigError, match="trials on npz \\(points\\) report w1, loss/D, loss/G; got 'modes'"):
        check_metric(cfg, "points")


def test_progress_counts_and_line_give_counts_and_an_eta_from_the_pace():
    statuses = ["TERMINATED", "TERMINATED", "RUNNING", "PAUSED", "ERROR", "PENDING"]
    counts = tune.progress_counts(statuses, total=10)  # 4 trials not created yet are pending too
    assert counts == {"done": 2, "running": 2, "pending": 5, "failed": 1}
    line = tune.progress_line(
        3, 10, "ab12c_00002", "finished", metric="w1", value=0.18344, seconds=42.0, counts=counts, elapsed=300.0
    )
    # 3 trials ended in 300 s, 7 left: 700 s
    assert line == (
        "[tune] trial 3/10 ab12c_00002 finished: w1=0.1834, 42 s | 2 done, 2 running, 5 pending, 1 failed"
        " | ETA 11.7 min"
    )
    done = tune.progress_counts(["TERMINATED"] * 3 + ["ERROR"], total=4)
    last = tune.progress_line(
        4, 4, "ab12c_00003", "failed", metric="w1", value=float("nan"), seconds=None, counts=done, elapsed=60.0
    )
    assert last.endswith("failed: w1=- | 3 done, 0 running, 0 pending, 1 failed | all ended")
    assert [tune.duration(s) for s in (42, 600, 7200)] == ["42 s", "10.0 min", "2.0 h"]


def test_a_method_search_names_its_invalid_combinations_and_refuses_one_with_none_valid():
    raw = read_yaml(ROOT / "params.yaml")
    # each value is valid alone; wgan-gp with batch norm is not (a per-sample critic)
    space = {"loss.name": {"choice": ["nonsaturating", "wgan-gp"]}, "model.d_norm": {"grid": ["none", "batch"]}}
    parsed = parse_space(space, raw)
    bad = tune.invalid_combinations(parsed, raw)
    assert [combo for combo, _ in bad] == [{"loss.name": "wgan-gp", "model.d_norm": "batch"}]
    assert "model.d_norm" in bad[0][1]
    assert tune.invalid_note(bad, parsed).startswith("1 of 4 combinations")
    only_bad = {"loss.name": {"choice": ["wgan-gp"]}, "model.d_norm": {"choice": ["batch"]}}
    with pytest.raises(ConfigError, match="no combination of loss.name, model.d_norm gives a valid config"):
        tune.invalid_combinations(parse_space(only_bad, raw), raw)
    # a continuous key beside one finite key: each value was checked alone already
    one = {"loss.name": {"choice": ["nonsaturating", "wgan-gp"]}, "train.lr_g": {"loguniform": [1e-4, 1e-2]}}
    assert tune.invalid_combinations(parse_space(one, raw), raw) == []


def test_an_invalid_trial_is_recorded_as_invalid_and_never_picked():
    class Result:  # what Tune hands back for a trial whose run_trial raised
        error = RuntimeError("wrapped")
        error.cause = tune.InvalidTrial("loss.name=wgan-gp, model.d_norm=batch: model.d_norm: batch norm ...")

    status, error = tune.trial_status(Result(), steps=100)
    assert status == "invalid" and error.startswith("InvalidTrial: loss.name=wgan-gp")
    rows = [{"trial_id": "a", "status": "invalid", "w1": 0.0}, {"trial_id": "b", "status": "finished", "w1": 0.5}]
    assert best_row(rows, "w1", "min")["trial_id"] == "b"


def test_a_trial_lost_before_its_first_report_is_a_failed_row_not_a_crash():
    """A trial whose node died before it reported: Tune hands back no config and no metrics (seen on a
    64-trial sweep whose worker node was killed: the stage ended in an AttributeError, no trials.csv)."""
    from types import SimpleNamespace

    cfg = build_config(read_yaml(Path(__file__).resolve().parents[2] / "params.yaml"))
    lost = SimpleNamespace(
        path="ray/ganpipe-tune-grid-0123/run_trial_45b51905_34_train_lr_d=0.0010_2026-12-01_15-23-48",
        config=None,
        metrics=None,
        metrics_dataframe=None,
        error=RuntimeError("The actor b8f62b8c is unavailable"),
    )
    (row,) = tune.summarise([lost], ["train.lr_d"], cfg)
    assert row["trial_id"] == "45b51905" and row["status"] == "failed" and row["train.lr_d"] is None
    assert row["score"] is None and "actor b8f62b8c is unavailable" in row["error"]


def test_a_trial_knows_its_own_checkpoint_from_a_pbt_donors():
    from types import SimpleNamespace

    from pipeline.ray.tune import own_checkpoint

    def at(path: str):
        return SimpleNamespace(path=path)

    sweep = "bucket/ray/ganpipe-tune-grid-0123"
    assert own_checkpoint(
        at(f"{sweep}/run_trial_c5f4d_00001_1_train_lr_g=0.0007_2026/checkpoint_000002"), "c5f4d_00001"
    )
    assert not own_checkpoint(
        at(f"{sweep}/run_trial_c5f4d_00004_4_train_lr_g=0.001_2026/checkpoint_000002"), "c5f4d_00001"
    )
    assert not own_checkpoint(None, "c5f4d_00001")


def test_a_trial_refused_by_the_tracking_server_says_where_its_credentials_come_from():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipeline.io.teamstack import free_port
    from pipeline.ray import distributed

    class Refuse(BaseHTTPRequestHandler):  # an MLflow server with basic auth, to a client without credentials
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 401)
            self.end_headers()

        def do_POST(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(ConnectionError, match=r"refused the credentials \(no credentials\).*`ray start`"):
            with pytest.MonkeyPatch.context() as mp:
                for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
                    mp.delenv(k, raising=False)
                distributed.check_tracking_here(uri, "the trial")
        distributed.check_tracking_here("sqlite:///nowhere.db", "the trial")  # a local store needs no credentials
        # a server that is away is no error here: a training's metrics wait for it
        distributed.check_tracking_here(f"http://127.0.0.1:{free_port()}", "rank 0 of the training")
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "folder, trial, number",
    [
        ("run_trial_c5f4d_00001_1_train_lr_g=0.0007_2026-12-01_10-41-32", "c5f4d_00001", 1),  # random search
        ("run_trial_80928700_4_train_lr_d=0.0021,train_lr_g=0.0004_2026-12-01_11-04-44", "80928700", 4),  # Optuna
        ("run_trial_2a17c2f7_11", "2a17c2f7", 11),
    ],
)
def test_a_trial_is_named_and_ordered_by_its_folder_whatever_searched(folder, trial, number):
    from types import SimpleNamespace

    result = SimpleNamespace(path=f"bucket/ray/ganpipe-tune-grid-0123/{folder}")
    assert tune.trial_id(result) == trial and tune.trial_number(result) == number


def test_a_trial_is_numbered_by_its_creation_not_its_id():
    from types import SimpleNamespace

    # Optuna's ids are random hex: sorting them would number the trials anyhow
    trials = [SimpleNamespace(trial_id=i, experiment_tag=f"{n}_train_lr_g=0.001") for n, i in enumerate(["f0", "0a"])]
    assert [tune.trial_position(trials, t) for t in trials] == [1, 2]
    skipped = SimpleNamespace(trial_id="b1", experiment_tag="3_train_lr_g=0.002")  # the counter skipped 2
    assert tune.trial_position([*trials, skipped], skipped) == 3
    untagged = SimpleNamespace(trial_id="x", experiment_tag="")
    assert tune.trial_position([*trials, untagged], untagged) == 3


def test_what_the_scheduler_and_search_need_of_the_space_is_checked_before_anything_starts(tmp_path, capsys):
    """PBT with nothing to mutate and Optuna with grid keys were refused only once Ray had started and
    the sweep's MLflow run was open (exit 1, an empty failed run left); now `check_search`, which the
    stage and `ganpipe check` call first (exit 2, invalid params)."""
    import yaml

    from pipeline import cli

    for tune_cfg, message in [
        ({"scheduler": "pbt", "search_space": {"model.hidden": {"choice": [64, 128]}}}, "pbt needs at least one"),
        (
            {"search_alg": "optuna", "search_space": {"train.lr_g": {"grid": [0.001, 0.002]}}},
            "optuna does not take grid keys",
        ),
    ]:
        raw = {**BASE, "tune": {**BASE["tune"], **tune_cfg}}
        cfg = build_config(raw)
        with pytest.raises(ConfigError, match=message):
            tune.check_search(cfg, parse_space(cfg.tune.search_space, raw))
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(raw))
        assert cli.main(["check", "--params", str(params)]) == 2
        assert message in capsys.readouterr().err
    fine = build_config(BASE)
    tune.check_search(fine, parse_space(fine.tune.search_space, BASE))  # the committed space passes
