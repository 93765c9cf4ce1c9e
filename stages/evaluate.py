"""evaluate: score the final (EMA) generator on held-out data; write metrics and plots."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core import data, datasets, protocol, training
from pipeline.core.objectives import of_spec
from pipeline.io import outputs, plots, tracking
from stages import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe evaluate", __doc__)
    common.inputs(p, "--data", "--models", "--features")
    common.path(p, "--metrics", outputs.EVAL_METRICS, "output metrics file")
    common.path(p, "--plots", outputs.PLOTS, "output plots folder")
    args = p.parse_args(argv)
    return common.run(lambda: evaluate(args))


def evaluate(args) -> None:
    cfg = common.config(args)
    uri = common.tracking_uri(cfg)
    prepared = data.load_prepared(args.data)
    G, spec = outputs.load_generator(f"{args.models}/generator.pt")
    run_id = outputs.read_run_record(args.models)["mlflow_run_id"]
    if of_spec(spec).translates:
        result = translation_scores(G, prepared, Path(args.features), Path(args.models), Path(args.plots), cfg)
        return _finish(args, uri, run_id, result)
    n = cfg.eval.n_samples
    # latents for evaluation are drawn apart from any training draw: seed + 1
    samples = training.sample(G, n, spec["z_dim"], cfg.seed + 1, num_classes=spec.get("num_classes"))
    dataset = cfg.data.name
    with outputs.atomic_dir(args.plots) as tmp:
        history = outputs.read_csv(Path(args.models) / "history.csv")
        outputs.write_csv(tmp / "losses.csv", history)
        plots.curves(history, ["loss/D", "loss/G", "D/real", "D/fake"], tmp / "losses.png")
        evals = _read_evals(Path(args.models) / "evals.csv")
        if evals:  # the in-training evaluations (eval.every): metric curves
            outputs.write_csv(tmp / "evals.csv", evals)
            plots.metric_panels(evals, tmp / "evals.png")
        if prepared.is_image:
            plots.image_grid(samples, tmp / "samples.png")
            k = spec.get("num_classes")
            if k:  # one column per class: labels are arange(n) % k
                plots.image_grid(samples[: k * k], tmp / "samples_by_class.png", nrow=k)
            result = image_scores(samples, prepared, spec, Path(args.features), cfg, tmp)
        else:
            real = prepared.x_val[:n]
            plots.scatter_2d(samples, real, datasets.centers(dataset), tmp / "samples.png", f"{n} generated samples")
            result = datasets.point_scores(dataset, samples, real)
    result["n_samples"] = n
    space = result.get("extractor", "points")
    extractor = protocol.extractor_hash(Path(args.features) / "extractor.pt") if prepared.is_image else None
    result["protocol"] = protocol.of_evaluation(space, extractor, len(prepared.x_val), n, cfg.seed + 1)
    _finish(args, uri, run_id, result)


def _finish(args, uri: str, run_id: str, result: dict) -> None:
    outputs.write_json(args.metrics, result)
    tracking.log_summary_metrics(uri, run_id, {f"eval/{k}": v for k, v in result.items()})
    if "protocol" in result:  # how these figures were measured: promote compares only like with like
        tracking.set_tags(uri, run_id, protocol.tags(result["protocol"]))
    tracking.log_artifacts(uri, run_id, [args.plots], "plots")
    shown = {k: v for k, v in result.items() if k != "protocol"}
    print("[evaluate] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    shown = ", ".join(sorted(p.name for p in Path(args.plots).glob("*.png")))
    print(f"[evaluate] plots in {args.plots}/ ({shown}); metrics in {args.metrics}")


def translation_scores(G, prepared, features_dir: Path, models_dir: Path, plots_dir: Path, cfg) -> dict:
    """CycleGAN: both directions scored on up to eval.n_samples validation images of each domain, each
    in its target domain's extractor space (`cyclegan.translation_metrics`); the plot shows
    x | G(x) | F(G(x)) | y | F(y) | G(F(y))."""
    from pipeline.core import cyclegan, features

    if prepared.b is None:
        raise ValueError(f"{models_dir}/generator.pt is a CycleGAN; the prepared data has no domain B (data.target)")
    ext_a, info_a = features.load_extractor(features_dir / "extractor.pt")
    ext_b, info_b = features.load_extractor(features_dir / "extractor_b.pt")
    n, a, b = cfg.eval.n_samples, prepared, prepared.b
    cut = lambda v: None if v is None else v[:n]
    result = cyclegan.translation_metrics(
        G, cut(a.x_val), cut(a.y_val), cut(b.x_val), cut(b.y_val), ext_a, ext_b, cfg.seed
    )
    result["extractor"] = info_b["extractor"] if info_a["extractor"] == info_b["extractor"] else "mixed"
    result["n_samples"] = min(n, len(a.x_val), len(b.x_val))
    with outputs.atomic_dir(plots_dir) as tmp:
        history = outputs.read_csv(models_dir / "history.csv")
        outputs.write_csv(tmp / "losses.csv", history)
        plots.curves(history, ["loss/D", "loss/G", "loss/cycle", "loss/identity"], tmp / "losses.png")
        plots.image_grid(cyclegan.triplets(G, a.x_val, b.x_val), tmp / "translations.png", nrow=6)
    return result


def _read_evals(path: Path) -> list[dict[str, float]]:
    return outputs.read_csv(path) if path.is_file() and path.stat().st_size else []


def image_scores(samples, prepared, spec, features_dir: Path, cfg, plots_dir: Path) -> dict:
    """FID, KID, precision/recall, density/coverage, class modes and class KL in the feature space of
    the pipeline's own extractor (named in the result: numbers from different extractors never mix),
    and the nearest training images of a few samples (plots_dir/nearest.png)."""
    from pipeline.core import features, metrics_image

    extractor, info = features.load_extractor(features_dir / "extractor.pt")
    real_f, real_p = features.embed(extractor, prepared.x_val)
    fake_f, fake_p = features.embed(extractor, samples)
    k = prepared.manifest["classes"] or extractor.num_classes
    labels = training.sample_labels(len(samples), spec.get("num_classes"))
    classifier = info["extractor"] == "classifier"  # a random extractor's classes are no labels
    sets = metrics_image.Sets(
        real_f, real_p, fake_f, fake_p, k, cfg.seed, labels.numpy() if labels is not None and classifier else None
    )
    result = {**metrics_image.score(sets), "extractor": info["extractor"]}
    train_f, _ = features.embed(extractor, prepared.x_train)
    plots.nearest_neighbours(samples, prepared.x_train, fake_f, train_f, plots_dir / "nearest.png")
    return result


if __name__ == "__main__":
    sys.exit(main())
