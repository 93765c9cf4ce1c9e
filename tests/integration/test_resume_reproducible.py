"""Killing the train stage mid-run and rerunning it resumes from the last checkpoint, and ends with
exactly the weights (and exported generator) of an uninterrupted run with the same params and seed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import set_params, sh, spawn

pytestmark = pytest.mark.integration
STEPS = 2000


def train_cmd(tag: str) -> list[str]:
    return [
        sys.executable,
        "stages/train.py",
        "--params",
        f"params-{tag}.yaml",
        "--models",
        f"models-{tag}",
        "--metrics",
        f"metrics-{tag}/train.json",
    ]


def train(project: Path, tag: str) -> subprocess.CompletedProcess:
    return sh(project, *train_cmd(tag))


def params_for(project: Path, tag: str) -> None:
    set_params(
        project,
        {"storage": {"root": f".ganpipe/{tag}"}, "train": {"steps": STEPS, "checkpoint_every": 200, "log_every": 100}},
    )
    (project / f"params-{tag}.yaml").write_text((project / "params.yaml").read_text())


def kill_after_step(project: Path, tag: str, step: int) -> None:
    """Start the train stage and SIGKILL its whole process group once it has logged `step`."""
    cmd = train_cmd(tag)
    p = spawn(project, *cmd)
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if line.startswith("[train] step ") and int(line.split()[2].split("/")[0]) >= step:
                break
        else:
            raise AssertionError("training ended before it could be interrupted:\n" + "".join(seen)[-3000:])
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def exported_outputs(project: Path, tag: str) -> np.ndarray:
    for stage, extra in (
        ("evaluate", ["--metrics", f"metrics-{tag}/eval.json", "--plots", f"plots-{tag}"]),
        (
            "export",
            ["--train-metrics", f"metrics-{tag}/train.json", "--eval-metrics", f"metrics-{tag}/eval.json"]
            + ["--out", f"export-{tag}"],
        ),
    ):
        sh(
            project,
            sys.executable,
            f"stages/{stage}.py",
            "--params",
            f"params-{tag}.yaml",
            "--models",
            f"models-{tag}",
            *extra,
        )
    import onnxruntime as ort

    sess = ort.InferenceSession(str(project / f"export-{tag}/generator.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(1).standard_normal((256, 2)).astype(np.float32)
    return sess.run(None, {"z": z})[0]


def test_killed_run_resumes_to_identical_weights(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    for tag in ("a", "b"):
        params_for(project, tag)

    train(project, "a")  # uninterrupted
    kill_after_step(project, "b", 600)
    assert not (project / "models-b").exists()  # nothing half-written for DVC to cache
    resumed = train(project, "b")
    lines = [ln for ln in resumed.stdout.splitlines() if "resuming from checkpoint at step" in ln]
    assert lines, resumed.stdout
    assert 0 < int(re.search(r"at step (\d+)", lines[0]).group(1)) < STEPS

    a = torch.load(project / "models-a/generator.pt", weights_only=True)["state_dict"]
    b = torch.load(project / "models-b/generator.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    da = torch.load(project / "models-a/discriminator.pt", weights_only=True)["state_dict"]
    db = torch.load(project / "models-b/discriminator.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(da[k], db[k]) for k in da)

    # the interrupted training continued its own MLflow run rather than opening a second one
    info_a = json.loads((project / "models-a/run.json").read_text())
    info_b = json.loads((project / "models-b/run.json").read_text())
    assert info_b["resumed"] is True and info_a["resumed"] is False and not info_b["handed_back"]
    assert info_a["mlflow_run_id"] != info_b["mlflow_run_id"]

    np.testing.assert_array_equal(exported_outputs(project, "a"), exported_outputs(project, "b"))
