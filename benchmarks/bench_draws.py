"""What staging a step's random draws costs on the CPU (pipeline/core/draws.py). Not a test.

    python benchmarks/bench_draws.py [--steps 2000]

The same bare training loop (one torch thread, no Ray), with the draws staged in one buffer per step
(as training runs) and drawn directly from their generators (as before); both give the same weights
bit for bit (tests/unit/test_gpu_path.py). On a GPU staging saves the host-device waits of direct
draws (benchmarks/gpu_check.py counts them); on the CPU it can only cost: this prints how much.
Figures come from one run on this machine, the two legs interleaved; compare the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.core import training
from pipeline.core.config import build_config, deep_merge, read_yaml


class Direct(training.Batches):
    def begin(self, step: int) -> None:  # no plan: every draw straight from its generator
        pass


CASES = {
    "grid MLP, batch 256 (the default)": {},
    "digits DCGAN, batch 64, ADA": {
        "data": {"name": "digits"},
        "model": {"arch": "dcgan", "hidden": 32},
        "train": {"batch_size": 64, "ada": {"enabled": True}},
    },
}


def run(over: dict, steps: int, cls) -> float:
    cfg = build_config(
        deep_merge(read_yaml("params.yaml"), deep_merge(over, {"train": {"steps": steps, "log_every": 200}}))
    )
    image = cfg.model.arch == "dcgan"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 1, 8, 8, generator=g) * 2 - 1 if image else torch.randn(5000, 2, generator=g)
    gan = training.build_gan(cfg, list(x.shape[1:]))
    gan.ada_p = 0.3
    batches = cls(x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed)
    t0 = time.perf_counter()
    training.train(gan, cfg, batches)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, over in CASES.items():
        staged, direct = [], []
        for _ in range(args.repeats):  # interleaved, so drifts of a shared machine hit both legs
            staged.append(run(over, args.steps, training.Batches))
            direct.append(run(over, args.steps, Direct))
        s, d = min(staged), min(direct)
        print(f"{name}: staged {1e3 * s:.3f} ms/step, direct {1e3 * d:.3f} ms/step, staged/direct {s / d:.3f}")


if __name__ == "__main__":
    main()
