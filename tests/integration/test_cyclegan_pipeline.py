"""CycleGAN digits <-> MNIST-5k through the stage scripts: prepare -> features -> train (Ray Train,
MLflow) -> evaluate -> export, with tiny params."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.ray.runtime import WorkerData
from tests.integration.conftest import set_params, sh

pytestmark = pytest.mark.integration

CYCLEGAN = {
    "data": {"name": "digits", "target": "mnist5k"},
    "model": {"family": "cyclegan", "arch": "dcgan", "hidden": 4, "layers": 1, "d_norm": "instance"},
    "loss": {"name": "lsgan", "cycle_weight": 10.0, "identity_weight": 1.0},
    "train": {"steps": 20, "batch_size": 8, "checkpoint_every": 10, "log_every": 10, "pool_size": 4, "ema": 0.0},
    "eval": {"n_samples": 100},
}


def test_cyclegan_stages_end_to_end(project: Path):
    set_params(project, CYCLEGAN)
    # the stage scripts must import this checkout's `pipeline`, not an editable install's; one torch
    # thread: the features stage trains two classifiers, and spin-waiting threads on a busy machine
    # made it 20x slower
    extra = {"PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}
    run = lambda script, *a: sh(project, sys.executable, f"stages/{script}.py", *a, extra_env=extra)
    for stage in ("prepare", "features", "train", "evaluate", "export"):
        run(stage)

    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert manifest["dataset"] == "digits" and manifest["target"]["dataset"] == "mnist5k"
    assert manifest["sample_shape"] == manifest["target"]["sample_shape"] == [1, 28, 28]
    assert (project / "data/features/extractor.pt").is_file() and (project / "data/features/extractor_b.pt").is_file()

    train = json.loads((project / "metrics/train.json").read_text())
    assert train["steps"] == 20 and train["loss_cycle"] > 0 and train["loss_identity"] > 0

    ev = json.loads((project / "metrics/eval.json").read_text())
    for d in ("xy", "yx"):
        for k in ("fid", "kid", "precision", "recall", "density", "coverage", "label_accuracy"):
            assert isinstance(ev[f"{d}/{k}"], float), f"{d}/{k}"
        assert ev[f"{d}/cycle_l1"] > 0 and ev[f"{d}/cycle_l1_noisy"] > 0
        assert isinstance(ev[f"{d}/noise_ratio"], float) and isinstance(ev[f"{d}/hidden_information"], bool)
        assert 0.0 <= ev[f"{d}/label_accuracy"] <= 1.0
    assert isinstance(ev["hidden_information"], bool) and ev["n_samples"] == 100
    assert (project / "plots/translations.png").stat().st_size > 0

    card = json.loads((project / "export/model_card.json").read_text())
    assert card["generators"]["generator_xy"]["direction"] == "X (digits) -> Y (mnist5k)"
    assert card["generators"]["generator_yx"]["direction"] == "Y (mnist5k) -> X (digits)"
    assert len(card["parity_max_abs_diff"]) == 4 and all(v < 1e-4 for v in card["parity_max_abs_diff"].values())
    assert set(card["mlflow"]["model_uris"]) == {"generator_xy", "generator_yx"}

    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32)
    outs = []
    for stem in ("generator_xy", "generator_yx"):
        assert (project / f"export/{stem}.pt").stat().st_size > 0
        sess = ort.InferenceSession(str(project / f"export/{stem}.onnx"), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": x})[0]
        assert out.shape == x.shape and np.abs(out).max() <= 1.0
        outs.append(out)
    assert not np.allclose(outs[0], outs[1]), "two different generators"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "models/run.json").read_text())["mlflow_run_id"]
    history = client.get_metric_history(run_id, "loss/cycle")
    assert [m.step for m in history] == [10, 20]
    assert client.get_metric_history(run_id, "loss/identity")


def test_cyclegan_two_workers_match_one_and_keep_each_pool(tmp_path: Path):
    """All four nets' gradients are averaged over Ray Train workers: with the pool off, 2 workers with
    batch B each end where 1 worker with batch 2B does; with it on, the checkpoint holds both pools.
    D without normalisation here: the DCGAN discriminator keeps conv biases before its norm layers,
    whose zero gradients Adam turns into rounding-noise steps that differ between 1 and 2 workers."""
    import ray
    import torch

    from pipeline.core import data
    from pipeline.core.config import build_config, deep_merge, read_yaml
    from pipeline.io import tracking
    from pipeline.ray import distributed
    from tests.integration.conftest import ROOT, TINY

    def fit(name: str, **train) -> dict:
        raw = deep_merge(deep_merge(read_yaml(ROOT / "params.yaml"), TINY), CYCLEGAN)
        raw = deep_merge(raw, {"storage": {"root": str(tmp_path / "ray")}, "train": {"steps": 6, **train}})
        raw = deep_merge(raw, {"model": {"d_norm": "none"}})
        cfg = build_config(raw)
        prepared = data.prepare(cfg.data, cfg.seed)
        uri = tracking.resolve_uri(None, env={}, cwd=tmp_path)
        run_id, _ = tracking.start_or_resume_run(uri, "cyclegan-dist", name, name)
        shipped = WorkerData.ship(prepared.x_train, x_b=prepared.b.x_train)
        state, _ = distributed.fit(cfg, shipped, tracking_uri=uri, run_id=run_id, name=name)
        return state

    distributed.ensure_ray(None, 2)
    try:
        one = fit("one", num_workers=1, pool_size=0, checkpoint_every=3)
        two = fit("two", num_workers=2, pool_size=0, checkpoint_every=3)
        pooled = fit("pooled", num_workers=2, pool_size=4, checkpoint_every=3)
    finally:
        ray.shutdown()
    for net in ("G", "D"):
        for k, v in one[net].items():
            assert torch.allclose(v, two[net][k], atol=1e-4), (net, k, (v - two[net][k]).abs().max())
    assert one["step"] == two["step"] == 6
    assert len(pooled["pools_by_rank"]) == 2
    for rank_pools in pooled["pools_by_rank"]:
        assert set(rank_pools) == {"x", "y"} and len(rank_pools["y"]["images"]) == 4
    assert not torch.equal(pooled["pools_by_rank"][0]["y"]["images"], pooled["pools_by_rank"][1]["y"]["images"])
