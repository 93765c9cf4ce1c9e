"""A preset's quality through the pipeline a user runs, on every seed: `dvc repro` per seed. Not a test.

    python benchmarks/bench_pipeline_seeds.py --preset grid-best [--seeds 0,1,2,3,4] [--set train.ema=0]

Copies the repository's code, params.yaml and dvc.yaml into a fresh git + DVC repository (no
stores, nothing to hand back), applies the preset with `ganpipe preset`, and for each seed runs
`dvc exp run -S seed=N` (prepare, features, train, evaluate, export), then prints each seed's
metrics/eval.json and the stability monitor's verdict, their mean and the training time from the run
record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def fresh_repo(preset: str, sets: list[str]) -> Path:
    proj = Path(tempfile.mkdtemp(prefix=f"bench-{preset}-"))
    for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, proj / name)
    for d in ("pipeline", "stages", "presets", "data/inputs"):
        shutil.copytree(ROOT / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    sh(proj, sys.executable, "-m", "pipeline.cli", "preset", preset)
    sh(proj, "git", "init", "-q")
    sh(proj, "dvc", "init", "-q")
    sh(proj, "git", "add", "-A")
    sh(proj, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", preset)
    return proj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--set", action="append", default=[], help="extra params, dvc exp run -S style")
    args = ap.parse_args()
    proj = fresh_repo(args.preset, args.set)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(
        f"{args.preset} {' '.join(args.set)}: {proj}; code of {commit.strip()}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.perf_counter()
        extra = [a for s in args.set for a in ("-S", s)]
        sh(proj, "dvc", "exp", "run", "-S", f"seed={seed}", *extra)
        m = json.loads((proj / "metrics/eval.json").read_text())
        run = json.loads((proj / "models/run.json").read_text())
        assert not run["handed_back"] and not run["resumed"], run
        verdict = json.loads((proj / "metrics/diagnostics.json").read_text())["verdict"]
        rows.append({**m, "verdict": verdict, "trained_s": run["trained_s"], "pipeline_s": time.perf_counter() - t0})
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items())
        print(f"seed {seed}: {shown}", flush=True)
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    print("mean: " + "  ".join(f"{k}={v:.4g}" for k, v in mean.items()))
    shutil.rmtree(proj, ignore_errors=True)


if __name__ == "__main__":
    main()
