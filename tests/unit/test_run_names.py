"""Readable MLflow run names: the DVC experiment's name or what is trained, and a short identity."""

from __future__ import annotations

from pipeline.core.config import build_config, deep_merge, load_config
from pipeline.ray import tune
from pipeline.ray.runtime import WorkerData
from stages import common


def test_a_run_is_named_after_its_dvc_experiment_or_what_it_trains(monkeypatch):
    cfg = load_config("params.yaml")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert common.run_label(cfg, "3f2a9c1b0d4e5f60") == "grid-nonsaturating-mlp-3f2a9c1b"
    assert common.run_label(cfg, "3f2a9c1b0d4e5f60", "tune") == "grid-nonsaturating-mlp-tune-3f2a9c1b"
    cycle = build_config(
        deep_merge(
            cfg.to_dict(),
            {"data": {"name": "digits", "target": "mnist5k"}, "model": {"family": "cyclegan", "arch": "dcgan"}},
        )
    )
    assert common.run_label(cycle, "ab" * 8) == "digits-mnist5k-nonsaturating-dcgan-abababab"
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-pews")
    assert common.run_label(cfg, "3f2a9c1b0d4e5f60") == "bushy-pews-3f2a9c1b"


def test_a_trial_is_named_after_its_sweep_and_its_index():
    job = tune.SweepJob(
        base_raw={},
        keys=[],
        data=WorkerData(x=None),
        live=None,
        tracking_uri="",
        experiment_id="",
        parent_run_id="",
        run_label="grid-nonsaturating-mlp-tune-3f2a9c1b",
    )
    assert tune.trial_run_name(job, "run_trial_5a1e2_00012") == "grid-nonsaturating-mlp-tune-3f2a9c1b-00012"
