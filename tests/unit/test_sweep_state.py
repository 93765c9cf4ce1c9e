"""A resumed sweep's checkpoint repair (pipeline.ray.sweep_state) with and without Tune's private helpers."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pipeline.ray import sweep_state


def test_a_sweep_with_no_snapshot_needs_no_repair(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert sweep_state.repair_pruned_checkpoints(str(tmp_path)) == []
    assert "warning" not in capsys.readouterr().err


def test_a_ray_without_tunes_private_helpers_resumes_without_the_repair_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    import ray.tune.execution.experiment_state  # noqa: F401  (the real one, then replaced)

    moved = types.ModuleType("ray.tune.execution.experiment_state")  # as if a Ray release moved the helper
    monkeypatch.setitem(sys.modules, "ray.tune.execution.experiment_state", moved)
    assert sweep_state.repair_pruned_checkpoints(str(tmp_path)) == []
    err = capsys.readouterr().err
    assert "_find_newest_experiment_checkpoint" in err and "resuming without that check" in err
