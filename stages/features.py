"""features: train the evaluation feature extractor (a small CNN classifier) on the real training
images; its penultimate layer is the space FID/KID/precision/recall are measured in. 2D data needs
none; unlabelled images get a clearly named random-init extractor. With a second domain (CycleGAN,
data.target) a second classifier, extractor_b.pt, is trained on domain B."""

from __future__ import annotations

import sys
import time

from pipeline.core import data, features
from pipeline.io import outputs
from stages import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe features", __doc__)
    common.inputs(p, "--data")
    common.path(p, "--out", outputs.FEATURES, "output folder")
    common.path(p, "--metrics", outputs.FEATURE_METRICS, "output metrics")
    args = p.parse_args(argv)
    return common.run(lambda: run(args))


def run(args) -> None:
    cfg = common.config(args)
    prepared = data.load_prepared(args.data)
    t0 = time.perf_counter()
    classes = prepared.manifest["classes"]
    with outputs.atomic_dir(args.out) as tmp:
        if not prepared.is_image:
            info = {"extractor": "none", "reason": "2D data is scored by mode coverage and W1"}
        elif prepared.y_train is None:
            model, info = features.random_extractor(prepared.x_train.shape[1:], cfg.seed)
            features.save_extractor(model, info, tmp / "extractor.pt")
        else:
            model, info = features.train_extractor(
                prepared.x_train, prepared.y_train, classes, cfg.seed, x_val=prepared.x_val, y_val=prepared.y_val
            )
            features.save_extractor(model, info, tmp / "extractor.pt")
        if prepared.b is not None:  # CycleGAN: domain B's images are scored by domain B's own classifier
            b = prepared.b
            model_b, info_b = features.train_extractor(
                b.x_train, b.y_train, b.manifest["classes"], cfg.seed, x_val=b.x_val, y_val=b.y_val
            )
            features.save_extractor(model_b, info_b, tmp / "extractor_b.pt")
            info = {**info, "target": info_b}
        outputs.write_json(tmp / "info.json", info)
    # the wall time goes to the metrics file only: data/features is the same bytes for the same seed and data
    shown = {k: info.get(k) for k in ("extractor", "val_accuracy") if info.get(k) is not None}
    if prepared.is_image:
        shown["seconds"] = round(time.perf_counter() - t0, 1)
    if "target" in info:
        shown["target_val_accuracy"] = info["target"]["val_accuracy"]
    outputs.write_json(args.metrics, shown)
    print(f"[features] {', '.join(f'{k}={v}' for k, v in shown.items())} -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
