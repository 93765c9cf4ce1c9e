"""The MNIST-5k benchmark preset end to end: prepare -> features -> train -> evaluate through the stage
scripts (real Ray, a local MLflow store, CPU), then the same metrics for real held-out data (the
floor) and the preset's targets. Not a test: it takes minutes.

    python benchmarks/bench_mnist5k.py [--preset mnist5k|mnist5k-conditional] [--steps N] [--out DIR]

Everything lands in DIR (default .bench/<preset>): params.yaml, data/, models/, metrics/, plots/, an
MLflow store and the Ray run folder; a rerun with the same params reuses the finished training.
Targets (issue #5): 10 of 10 class modes, class KL <= 0.05, precision and recall >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import deep_merge, read_yaml  # noqa: E402

KEYS = ["fid", "kid", "precision", "recall", "density", "coverage", "class_modes", "class_kl", "label_accuracy"]
TARGETS = {"class_modes": (">=", 10), "class_kl": ("<=", 0.05), "precision": (">=", 0.7), "recall": (">=", 0.7)}


def stage(out: Path, name: str, *args: str) -> float:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), "--params", str(out / "params.yaml"), *args]
    subprocess.run(cmd, cwd=out, env=env, check=True)
    return time.perf_counter() - t


def floor(out: Path, seed: int) -> dict:
    """The evaluate stage's metrics for real training images in place of generated ones."""
    import numpy as np

    from pipeline.core import data, features, metrics_image

    p = data.load_prepared(out / "data/prepared")
    model, _ = features.load_extractor(out / "data/features/extractor.pt")
    n = min(len(p.x_train), 2500)
    real_f, real_p = features.embed(model, p.x_val)
    fake_f, fake_p = features.embed(model, p.x_train[np.random.default_rng(seed).permutation(len(p.x_train))[:n]])
    return metrics_image.image_metrics(real_f, real_p, fake_f, fake_p, p.manifest["classes"], seed)


def check(result: dict) -> list[str]:
    out = []
    for k, (op, v) in TARGETS.items():
        ok = result[k] >= v if op == ">=" else result[k] <= v
        out.append(f"{k} {result[k]:.4g} {op} {v}: {'met' if ok else 'MISSED'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mnist5k")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or ROOT / ".bench" / args.preset).resolve()
    # a clean run: never a Ray run or MLflow store of an earlier benchmark to hand back
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    params = deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "presets" / f"{args.preset}.yaml"))
    params = deep_merge(params, {"storage": {"root": str(out / "ray")}, "eval": {"n_samples": 2500}})
    if args.steps:
        params["train"]["steps"] = args.steps
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"{args.preset}: {params['train']['steps']} steps; load average {os.getloadavg()[0]:.1f}", flush=True)

    times = {
        "prepare": stage(out, "prepare", "--out", "data/prepared"),
        "features": stage(out, "features", "--out", "data/features", "--metrics", "metrics/features.json"),
        "train": stage(out, "train", "--models", "models", "--metrics", "metrics/train.json"),
        "evaluate": stage(out, "evaluate", "--metrics", "metrics/eval.json", "--plots", "plots"),
    }
    result = json.loads((out / "metrics/eval.json").read_text())
    base = floor(out, params["seed"])
    print(f"\n{'':22s}" + "".join(f"{k:>15s}" for k in KEYS))
    for name, m in (("generator (EMA)", result), ("floor: real train set", base)):
        print(f"{name:22s}" + "".join(f"{m[k]:15.4g}" if k in m else f"{'-':>15s}" for k in KEYS))
    print("\ntargets: " + "; ".join(check(result)))
    print("stage wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    print(f"features: {json.loads((out / 'metrics/features.json').read_text())}")
    print(f"plots: {', '.join(sorted(p.name for p in (out / 'plots').iterdir()))} in {out / 'plots'}")


if __name__ == "__main__":
    main()
