"""CycleGAN digits <-> MNIST-5k (presets/cyclegan-digits-mnist.yaml), in process on CPU, no Ray or MLflow.

Trains the preset (the same training loop the train stage runs under Ray Train), a feature extractor
per domain (as the features stage does), then prints per direction: label preservation (the target
domain's classifier gives the translation the source image's label; target >= 80%), next to the same
classifier on the untranslated inputs as a baseline, FID to the target domain's validation images,
the cycle reconstruction error and the hidden-information (noise) diagnostic.

    python benchmarks/bench_cyclegan.py [--steps N] [--threads T] [--set model.hidden=16 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.core import cyclegan, data, features, metrics_image, training
from pipeline.core.config import build_config, deep_merge, read_yaml, unflatten

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="override train.steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="write a grid of translations (x | G(x) | F(G(x)) ...) to this PNG")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides (YAML values)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw = deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "presets/cyclegan-digits-mnist.yaml"))
    if args.steps:
        raw = deep_merge(raw, {"train": {"steps": args.steps}})
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    raw = deep_merge(raw, unflatten(overrides))
    cfg = build_config(raw)
    print(f"model {cfg.model.model_dump()}\nloss {cfg.loss.model_dump()}\ntrain {cfg.train.model_dump()}", flush=True)
    p = data.prepare(cfg.data, cfg.seed)
    t0 = time.perf_counter()
    ext_a, info_a = features.train_extractor(p.x_train, p.y_train, 10, cfg.seed, x_val=p.x_val, y_val=p.y_val)
    ext_b, info_b = features.train_extractor(p.b.x_train, p.b.y_train, 10, cfg.seed, x_val=p.b.x_val, y_val=p.b.y_val)
    print(
        f"extractors: {cfg.data.name} val acc {info_a['val_accuracy']:.3f}, {cfg.data.target} val acc "
        f"{info_b['val_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)"
    )
    gan = training.build_gan(cfg, list(p.x_train.shape[1:]))
    batches = training.Batches(
        torch.from_numpy(p.x_train), cfg.train.batch_size, 1, cfg.seed, x_b=torch.from_numpy(p.b.x_train)
    )
    t0 = time.perf_counter()
    training.train(gan, cfg, batches, training.Hooks(on_log=lambda s, m: print(f"  step {s}: " + _fmt(m), flush=True)))
    print(f"trained {cfg.train.steps} steps in {time.perf_counter() - t0:.0f}s")
    G = gan.G_ema if gan.G_ema is not None else gan.G
    m = cyclegan.translation_metrics(G, p.x_val, p.y_val, p.b.x_val, p.b.y_val, ext_a, ext_b, cfg.seed)
    base = {
        "xy": metrics_image.label_accuracy(features.embed(ext_b, p.x_val)[1], p.y_val),
        "yx": metrics_image.label_accuracy(features.embed(ext_a, p.b.x_val)[1], p.b.y_val),
    }
    # a translation by hand, no learning: MNIST rendered the way scikit-learn's digits were made (the
    # 20x20 digit box averaged down to 8x8, then framed like the digits); the digits classifier's
    # accuracy on it shows how much of the label loss is the classifier's, not the translator's
    rendered = {
        d: metrics_image.label_accuracy(features.embed(ext, _render_as_digits(src))[1], labels)
        for d, name, src, labels, ext in (
            ("xy", cfg.data.target, p.x_val, p.y_val, ext_b),
            ("yx", cfg.data.name, p.b.x_val, p.b.y_val, ext_a),
        )
        if name == "digits" and src.shape[-1] == 28
    }
    names = {"xy": f"{cfg.data.name} -> {cfg.data.target}", "yx": f"{cfg.data.target} -> {cfg.data.name}"}
    for d in ("xy", "yx"):
        print(
            f"{names[d]:>18}: label accuracy {m[f'{d}/label_accuracy']:.3f} (untranslated {base[d]:.3f}), "
            f"FID {m[f'{d}/fid']:.2f}, cycle L1 {m[f'{d}/cycle_l1']:.4f}, noisy {m[f'{d}/cycle_l1_noisy']:.4f} "
            f"(ratio {m[f'{d}/noise_ratio']:.2f}, gain {m[f'{d}/noise_gain']:.2f}, hidden {m[f'{d}/hidden_information']})"
        )
        if d in rendered:
            print(f"{'':>18}  the same classifier on the inputs rendered at the digits' 8x8 by hand: {rendered[d]:.3f}")
    # where labels are lost: per-class accuracy of each direction's translations
    for d, fwd, src, y, ext in (("xy", G.xy, p.x_val, p.y_val, ext_b), ("yx", G.yx, p.b.x_val, p.b.y_val, ext_a)):
        pred = features.embed(ext, cyclegan.translate(fwd, src))[1].argmax(1)
        wrong = [np.bincount(pred[(y == c) & (pred != c)], minlength=10) for c in range(10)]
        per = [f"{c}:{np.mean(pred[y == c] == c):.2f}(->{w.argmax() if w.any() else '-'})" for c, w in enumerate(wrong)]
        print(f"{names[d]:>18}: per class accuracy (most common wrong label) " + " ".join(per))
    if args.save:
        from pipeline.io import plots

        rows = cyclegan.triplets(G, p.x_val, p.b.x_val, n=16)
        plots.image_grid(rows, Path(args.save), nrow=6, max_rows=16)
    ok = min(m["xy/label_accuracy"], m["yx/label_accuracy"]) >= 0.8
    print(
        f"label preservation >= 80% both ways: {'yes' if ok else 'NO'}; hidden information: {m['hidden_information']}"
    )


def _render_as_digits(x: np.ndarray) -> np.ndarray:
    """MNIST-framed images (N, 1, 28, 28) -> the 20x20 digit box averaged down to 8x8 (as the digits'
    32x32 bitmaps were counted in 4x4 blocks), framed back on the canvas like the digits."""
    box = torch.from_numpy(x[:, :, 4:24, 4:24])
    small = torch.nn.functional.interpolate(box, size=(8, 8), mode="area")
    return data.to_canvas(small.numpy(), 28)


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float) and k.startswith(("loss", "D/")))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
