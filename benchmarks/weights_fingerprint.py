"""Fingerprints of G and D after a few training steps, for configurations that touch every random
stream of a step: a refactor that claims to change no number must leave them all equal. Not a test.

    python benchmarks/weights_fingerprint.py --out before.json     # on the code before the change
    python benchmarks/weights_fingerprint.py --compare before.json # after: exit 1 on any difference

The cases: the grid MLP (non-saturating with R1, WGAN-GP with 3 critic steps, simultaneous updates),
the digits DCGAN (ADA with 2 critic steps; DiffAugment with a conditional model) and CycleGAN
digits <-> MNIST-5k (WGAN-GP, 2 critic steps, history pools). One torch thread, in process, 12 steps.
Equal fingerprints are promised on one kind of CPU only (docs/reproducibility.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from pipeline.core import data, training
from pipeline.core.config import build_config, deep_merge, read_yaml, unflatten

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {"data.name": "digits", "model.arch": "dcgan", "model.hidden": 16, "train.batch_size": 32}
CASES: dict[str, dict] = {
    "grid-nonsaturating-r1": {},
    "grid-wgan-gp-ncritic3": {"loss.name": "wgan-gp", "loss.r1_gamma": 0.0, "train.n_critic": 3},
    "grid-simultaneous": {"train.update": "simultaneous"},
    "digits-ada-ncritic2": {**DIGITS, "train.ada.enabled": True, "train.ada.interval": 2, "train.n_critic": 2},
    "digits-diffaugment-conditional": {**DIGITS, "train.augment": "diffaugment", "model.conditional": True},
    "cyclegan-wgan-gp-ncritic2": {
        **DIGITS,
        "data.target": "mnist5k",
        "model.family": "cyclegan",
        "model.hidden": 8,
        "model.d_norm": "instance",
        "train.batch_size": 8,
        "loss.name": "wgan-gp",
        "loss.r1_gamma": 0.0,
        "train.n_critic": 2,
    },
}
SHORT = {"train.steps": 12, "train.log_every": 4, "train.monitor_every": 4, "eval.every": 0}


def fingerprint(overrides: dict) -> str:
    cfg = build_config(deep_merge(read_yaml(ROOT / "params.yaml"), unflatten({**overrides, **SHORT})))
    p = data.prepare(cfg.data, cfg.seed)
    x = torch.tensor(p.x_train)
    classes = p.manifest["classes"] if cfg.model.conditional else None
    y = torch.tensor(p.y_train) if classes else None
    x_b = torch.tensor(p.b.x_train) if cfg.model.family == "cyclegan" else None
    gan = training.build_gan(cfg, list(x.shape[1:]), "cpu", classes)
    batches = training.Batches(
        x, cfg.train.batch_size, cfg.model.z_dim, cfg.seed, y=y, num_classes=classes or 0, x_b=x_b,
        heldout=torch.tensor(p.x_val),
    )  # fmt: skip
    training.train(gan, cfg, batches)
    h = hashlib.sha256()
    for net in (gan.G, gan.D):
        for t in net.state_dict().values():
            h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="write the fingerprints here (JSON)")
    ap.add_argument("--compare", type=Path, help="compare with fingerprints written before; exit 1 on a difference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    before = json.loads(args.compare.read_text()) if args.compare else {}
    now, differ = {}, []
    for name, overrides in CASES.items():
        now[name] = fingerprint(overrides)
        mark = (
            "" if name not in before else ("  same" if before[name] == now[name] else f"  DIFFERS (was {before[name]})")
        )
        differ += [name] if mark.startswith("  DIFFERS") else []
        print(f"{name:34s} {now[name]}{mark}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(now, indent=1) + "\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
