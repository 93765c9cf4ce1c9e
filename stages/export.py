"""export: the generator as TorchScript and ONNX (parity-checked), a model card, logged to MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.objectives import of_spec
from pipeline.io import export, outputs, tracking
from stages import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe export", __doc__)
    common.inputs(p, "--data", "--models", "--train-metrics", "--eval-metrics", "--diagnostics")
    common.path(p, "--out", outputs.EXPORT, "output folder")
    args = p.parse_args(argv)
    return common.run(lambda: run_export(args))


def run_export(args) -> None:
    cfg = common.config(args)
    lineage = export.Lineage(
        manifest=outputs.read_json(Path(args.data) / "manifest.json", "run the prepare stage first"),
        train=outputs.read_json(args.train_metrics, "run the train stage first"),
        record=outputs.read_run_record(args.models),
        eval=outputs.read_json(args.eval_metrics, "run the evaluate stage first"),
        git=outputs.git_commit(),
    )
    diagnosis = outputs.read_json(args.diagnostics, "run the train stage first")
    G, spec = outputs.load_generator(Path(args.models) / "generator.pt")
    uri = common.tracking_uri(cfg)
    run_id = lineage.record["mlflow_run_id"]
    if of_spec(spec).translates:
        return _export_translators(args, cfg, G, spec, lineage, uri=uri, diagnosis=diagnosis)
    with outputs.atomic_dir(args.out) as tmp:
        files, diffs = export.export_all(G, spec["z_dim"], list(cfg.export.formats), tmp, spec.get("num_classes"))
        card = export.model_card(spec, cfg, lineage, diffs=diffs, model_uri=None)
        card["files"] = {fmt: f"{args.out}/{p.name}" for fmt, p in files.items()}
        outputs.write_json(tmp / "model_card.json", card)
    # the registry learns of the model only once the export folder is complete on disk
    model_uri = None
    if "onnx" in files:
        example = export.example_inputs(spec["z_dim"], spec.get("num_classes"))
        onnx_file = Path(args.out) / files["onnx"].name
        model_uri = tracking.log_onnx_model(
            uri, run_id, onnx_file, cfg.export.model_name, example=example, torch_model=G
        )
        card["mlflow"]["model_uri"] = model_uri
        outputs.write_json(Path(args.out) / "model_card.json", card)  # atomic: the folder stays complete
    tracking.log_artifacts(uri, run_id, [args.out], "export")
    shown = ", ".join(f"{k} max|diff|={v:.2e}" for k, v in diffs.items())
    print(f"[export] {', '.join(card['files'].values())} ({shown}); model card {args.out}/model_card.json")
    if model_uri:
        print(f"[export] registered in MLflow as {model_uri}")
    _summary(lineage, uri, diagnosis)


def _export_translators(args, cfg, G, spec, lineage: export.Lineage, *, uri: str, diagnosis: dict) -> None:
    """CycleGAN: generator_xy (G: X -> Y) and generator_yx (F: Y -> X), each registered in MLflow as
    `<export.model_name>-xy` / `-yx`."""
    with outputs.atomic_dir(args.out) as tmp:
        files, diffs = export.export_translators(G, spec["sample_shape"], list(cfg.export.formats), tmp)
        card = export.translator_card(spec, cfg, lineage, diffs=diffs, model_uris={})
        card["files"] = {key: f"{args.out}/{p.name}" for key, p in files.items()}
        outputs.write_json(tmp / "model_card.json", card)
    # the registry learns of the models only once the export folder is complete on disk
    record, model_uris = lineage.record, {}
    for stem in export.TRANSLATORS:
        if f"{stem}.onnx" in files:
            name = f"{cfg.export.model_name}-{export.TRANSLATORS[stem]}"
            onnx_file = Path(args.out) / files[f"{stem}.onnx"].name
            translator = getattr(G, export.TRANSLATORS[stem])
            example = export.image_inputs(spec["sample_shape"])
            model_uris[stem] = tracking.log_onnx_model(
                uri, record["mlflow_run_id"], onnx_file, name, stem, example=example, torch_model=translator
            )
    if model_uris:
        card["mlflow"]["model_uris"] = model_uris
        outputs.write_json(Path(args.out) / "model_card.json", card)  # atomic: the folder stays complete
    tracking.log_artifacts(uri, record["mlflow_run_id"], [args.out], "export")
    shown = ", ".join(f"{k} max|diff|={v:.2e}" for k, v in diffs.items())
    print(f"[export] {', '.join(card['files'].values())} ({shown}); model card {args.out}/model_card.json")
    for stem, model_uri in model_uris.items():
        print(f"[export] {stem} ({card['generators'][stem]['direction']}) registered in MLflow as {model_uri}")
    _summary(lineage, uri, diagnosis, "generator_xy / generator_yx (.onnx, .pt), model_card.json")


def _summary(lineage: export.Lineage, uri: str, diagnosis: dict, model: str = "") -> None:
    """What a user wants to see when the pipeline ends."""
    eval_info, train_info, record = lineage.eval, lineage.train, lineage.record
    figures = {k: v for k, v in eval_info.items() if not isinstance(v, dict)}
    shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(figures.items()))
    p = eval_info.get("protocol")
    measured = (
        f"measured  in {p['space']} space{' (extractor ' + p['extractor_sha256'] + ')' if p['extractor_sha256'] else ''}"
        f", {p['n_fake']} samples (seed {p['seed']}) vs {p['n_real']} {p['real_split']} samples\n"
        if p
        else ""
    )
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else tracking.redact(uri)
    print(
        "\n== ganpipe summary ==\n"
        f"metrics   {shown}\n"
        f"{measured}"
        f"training  {_trained(train_info, record)}, MLflow run {record['mlflow_run_id']}\n"
        f"stability {_stability(diagnosis)}\n"
        "plots     plots/samples.png, plots/losses.png   (dvc plots show: all of them as HTML)\n"
        f"model     {model or 'export/generator.onnx, export/generator.pt, export/model_card.json'}\n"
        f"MLflow UI {ui}"
    )


def _stability(diagnosis: dict) -> str:
    """The monitor's verdict, each problem with the step it was first seen at (metrics/diagnostics.json)."""
    firsts = {}
    for e in diagnosis.get("events", []):
        firsts.setdefault(e["kind"], e["step"])
    if not firsts:
        return "healthy (no instability seen; metrics/diagnostics.json)"
    seen = ", ".join(f"{k} at step {v}" for k, v in firsts.items())
    return f"{diagnosis['verdict']}: {seen} (metrics/diagnostics.json)"


def _trained(train_info: dict, record: dict) -> str:
    """How the model came to be, honestly: trained now, resumed, or handed back from an earlier run."""
    how = "trained"
    if record.get("handed_back"):
        how = "reused finished run, trained"
    elif record.get("resumed"):
        how = "resumed and trained"
    when = f" (finished {record['finished_at']})" if record.get("finished_at") else ""
    return f"{train_info['steps']} steps, {how} in {record['trained_s']:.0f}s{when}"


if __name__ == "__main__":
    sys.exit(main())
