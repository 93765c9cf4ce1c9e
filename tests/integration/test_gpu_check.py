"""benchmarks/gpu_check.py runs in the suite on CPU (`--device cpu --quick`), so it never rots: every
section passes, and its figures say what they must (ranks equal, N workers equal 1, reruns and
resumes bit-exact, export parity)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_passes_on_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True
    for section in ("environment", "device_matrix", "distributed", "determinism", "throughput", "export"):
        assert report[section]["ok"] is True, (section, report[section])
    cases = report["device_matrix"]["cases"]
    assert {"grid_mlp", "dcgan_wgan-gp", "dcgan_ada", "dcgan_conditional", "cyclegan", "dcgan_bf16"} <= set(cases)
    assert all(
        c["finite_losses"] and c["roundtrip_equal"] and not c["off_device"]
        for c in cases.values()
        if "skipped" not in c
    )
    dist = report["distributed"]
    assert dist["two_processes"]["ranks_bitwise_equal"] is True
    assert dist["two_processes"]["grad_mean"] == [1.5, 1.5]  # (1 + 2) / 2 on both ranks
    assert dist["two_processes"]["max_abs_diff_vs_1_worker"] <= dist["tolerance"]
    assert report["determinism"]["deterministic_runs_bitwise_equal"] is True
    assert report["determinism"]["resume_equals_uninterrupted"] is True
    runs = report["throughput"]["runs"]
    assert runs["dcgan28_b16_fp32"]["steps_per_s"] > 0 and runs["dcgan28_b32_bf16"]["images_per_s"] > 0
    assert max(report["export"]["exported_vs_torch_max_abs_diff"].values()) < report["export"]["tolerance"]
