"""The stability monitor on a labelled set of runs, and what it costs. Not a test.

    python benchmarks/bench_monitor.py [--only NAME] [--cost-steps 3000] [--json out.json]
    python benchmarks/bench_monitor.py --presets grid grid-best --seeds 5    # false positives at full length

Runs every case of benchmarks/monitor_cases.py (healthy and broken, with the failure's onset) through
the bare training loop (one torch thread) and prints, per case, the verdict and the step it was first
seen; then the detection rate over the broken cases (the expected verdict found), the false-positive
rate over the healthy ones (any problem raised) and the median detection delay in steps.

`--presets`: the named presets (presets/<name>.yaml over params.yaml) at their full length, over
`--seeds` seeds, must raise no flag; prints each run's verdict.

The cost: the default model's step time with the monitor's signals (the per-step statistics and
the ticks) against the same loop with them switched off, the two legs interleaved in one run;
the ratio is what matters on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import monitor_cases  # noqa: E402

from pipeline.core import losses, monitor, training  # noqa: E402


def detection(only: str | None) -> list[dict]:
    rows = []
    for case in monitor_cases.CASES:
        if only and only not in case.name:
            continue
        r = monitor_cases.run(case)
        ok = (r["verdict"] == "healthy") if case.expect == "healthy" else r["first_seen"] is not None
        r["ok"] = ok
        rows.append(r)
        seen = "" if r["first_seen"] is None else f" first seen at step {r['first_seen']} (delay {r['delay']})"
        print(
            f"{'ok  ' if ok else 'MISS'} {case.name:45s} expect {case.expect:22s} got {r['verdict']:22s}"
            f"{seen}  problems {r['problems']}  {r['step_s'] * 1e3:.2f} ms/step",
            flush=True,
        )
    return rows


class _Off:
    """The monitor's signals switched off: the loop as it was before the monitor."""

    def __enter__(self):
        zero = torch.zeros(())
        self.patches = [
            (training, "grad_norm", lambda m: zero),
            (training, "probe_stats", lambda *a, **k: {}),
            (training, "batch_spread", lambda f, r: zero),
            (losses.Terms, "accuracy", lambda self, r, f: (zero, zero)),
            (training, "tick_signals", lambda *a: {}),
            (monitor.Monitor, "observe", lambda self, *a, **k: []),
        ]
        self.saved = [getattr(owner, name) for owner, name, _ in self.patches]
        for owner, name, stand_in in self.patches:
            setattr(owner, name, stand_in)
        return self

    def __exit__(self, *exc):
        for (owner, name, _), original in zip(self.patches, self.saved):
            setattr(owner, name, original)


def cost(steps: int, rounds: int = 6) -> dict:
    """Paired legs, their order alternating from round to round (so a drift in the machine's speed
    falls on both): the median of the per-round ratios, and the ratio of the fastest legs."""
    case = monitor_cases.Case("grid default", {"train": {"steps": steps, "on_divergence": "rollback"}}, "healthy")
    monitor_cases.run(monitor_cases.Case("warm-up", {"train": {"steps": 100}}, "healthy"))
    times: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds):
        for leg in ("off", "on") if r % 2 == 0 else ("on", "off"):
            if leg == "off":
                with _Off():
                    times[leg].append(monitor_cases.run(case)["step_s"])
            else:
                times[leg].append(monitor_cases.run(case)["step_s"])
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    on, off = min(times["on"]), min(times["off"])
    return {
        "step_ms_on": on * 1e3,
        "step_ms_off": off * 1e3,
        "ratio_of_fastest": on / off,
        "median_ratio": statistics.median(ratios),
        "ratios": [round(x, 4) for x in ratios],
        "rounds": rounds,
    }


def presets(names: list[str], seeds: int) -> list[dict]:
    from pipeline.core.config import deep_merge, read_yaml

    root = Path(__file__).resolve().parents[1]
    base = read_yaml(root / "params.yaml")
    rows = []
    for name in names:
        preset = deep_merge(base, read_yaml(root / "presets" / f"{name}.yaml"))
        params = {k: preset[k] for k in ("data", "model", "loss", "train")}
        params["train"] = {**params["train"], "on_divergence": "warn"}
        for seed in range(seeds):
            r = monitor_cases.run(monitor_cases.Case(f"{name} seed {seed}", {**params, "seed": seed}, "healthy"))
            r["ok"] = r["verdict"] == "healthy"
            rows.append(r)
            print(
                f"{'ok  ' if r['ok'] else 'FLAG'} {r['case']:30s} {r['steps']} steps  {r['verdict']}  "
                f"events {[(e['kind'], e['step']) for e in r['report']['events']]}",
                flush=True,
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--cost-steps", type=int, default=3000, help="steps per leg of the cost measure (0 = skip)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--presets", nargs="*", help="run these presets at full length instead of the labelled set")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.presets:
        rows = presets(args.presets, args.seeds)
        flagged = [r["case"] for r in rows if not r["ok"]]
        print(json.dumps({"runs": len(rows), "flagged": flagged, "wall_s": round(time.perf_counter() - t0, 1)}))
        return 0
    rows = detection(args.only)
    broken = [r for r in rows if r["expect"] != "healthy"]
    healthy = [r for r in rows if r["expect"] == "healthy"]
    delays = [r["delay"] for r in broken if r["delay"] is not None]
    summary = {
        "broken": len(broken),
        "detected": sum(r["ok"] for r in broken),
        "healthy": len(healthy),
        "false_positives": sum(not r["ok"] for r in healthy),
        "median_delay_steps": statistics.median(delays) if delays else None,
    }
    if broken:
        summary["detection_rate"] = summary["detected"] / len(broken)
    if healthy:
        summary["false_positive_rate"] = summary["false_positives"] / len(healthy)
    if args.cost_steps:
        summary["cost"] = cost(args.cost_steps)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2))
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "report"} for r in rows]
        args.json.write_text(json.dumps({"summary": summary, "cases": slim}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
