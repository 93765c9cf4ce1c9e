"""tune: a hyperparameter search on Ray Tune over `tune.search_space`, one MLflow sweep; writes the
trials table and the full params with the best trial's values merged in."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import yaml

from pipeline.core import data, identity, live_eval, protocol
from pipeline.core.config import deep_merge, flatten, read_yaml, unflatten
from pipeline.core.objectives import objective
from pipeline.core.secrets import redact_tree
from pipeline.io import outputs, tracking
from pipeline.ray import distributed, runtime, tune
from stages import common

STATUS = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED", "invalid": "FAILED"}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe tune", __doc__)
    common.inputs(p, "--data", "--features")
    common.path(p, "--out", outputs.TUNE, "output folder")
    args = p.parse_args(argv)
    return common.run(lambda: run(args))


def run(args) -> None:
    cfg = common.config(args)
    common.check_locations(cfg, "storage.root")
    raw = read_yaml(args.params)
    tune.check_tunable(cfg)
    parsed = tune.parse_space(cfg.tune.search_space, raw)  # refuses a bad space before anything starts
    tune.check_search(cfg, parsed)
    invalid = tune.invalid_combinations(parsed, raw)  # refuses a space with no valid combination
    if invalid:
        print(f"[tune] note: {tune.invalid_note(invalid, parsed)}")
    prepared = data.load_prepared(args.data)
    data.check_fits_model(prepared.manifest, cfg.model.arch)  # an npz holds points or images
    tune.check_metric(cfg, prepared.manifest["kind"])
    uri = common.tracking_uri(cfg)
    print(f"[tune] {common.start_ray(cfg, uri)}")
    data_hash = prepared.manifest["content_hash"]
    # the sweep's identity: everything the tune stage depends on (params, data, code)
    # image trials are scored in the features stage's extractor: its weights are part of the sweep
    scored = prepared.is_image and not objective(cfg.model.family).translates
    extractor = protocol.extractor_hash(Path(args.features) / "extractor.pt") if scored else None
    ident = identity.identity(
        cfg.to_dict(), identity.TUNE_PARAMS, data_hash, identity.code_fingerprint(identity.TUNE_SOURCES), extractor
    )
    name = tune.sweep_name(cfg, identity.key(ident))
    # every snapshot of the sweep copies its whole folder: on S3, files already there are not sent again
    storage_path, fs = distributed.storage_filesystem(
        cfg.storage.root, cfg.storage.s3_endpoint_url, skip_unchanged=True
    )
    sweep_key = hashlib.sha256(distributed.run_address(cfg.storage.root, name).encode()).hexdigest()[:16]
    tags = {"ganpipe.kind": "sweep", "ganpipe.identity": identity.key(ident), **common.dvc_experiment()}
    # one process at a time per sweep: a second one would restore and overwrite its trials
    lease = distributed.run_lease(cfg.storage.root, cfg.storage.s3_endpoint_url, name, f"the sweep {name}")
    with lease:
        _sweep(
            args,
            cfg,
            prepared,
            raw=raw,
            parsed=parsed,
            uri=uri,
            data_hash=data_hash,
            name=name,
            storage_path=storage_path,
            fs=fs,
            sweep_key=sweep_key,
            tags=tags,
        )


def _sweep(
    args,
    cfg,
    prepared,
    *,
    raw: dict,
    parsed: dict,
    uri: str,
    data_hash: str,
    name: str,
    storage_path: str,
    fs,
    sweep_key: str,
    tags: dict,
) -> None:
    label = common.run_label(cfg, name.rsplit("-", 1)[-1], "tune")
    parent, resumed = tracking.start_or_resume_run(uri, cfg.tracking.experiment, sweep_key, label, tags)
    # from here on the sweep's MLflow run is ended (FAILED, or KILLED on Ctrl-C) if the stage stops
    with tracking.closing_run(uri, parent):
        tracking.log_params(uri, parent, {**flatten(cfg.public_dict()), "data.content_hash": data_hash})
        exp_id = tracking.experiment_id(uri, cfg.tracking.experiment)
        print(
            f"[tune] sweep {name}: {cfg.tune.num_samples} sample(s) over {', '.join(parsed)}; "
            f"scheduler {cfg.tune.scheduler}, search {cfg.tune.search_alg}; MLflow run {parent}"
            f"{' (resumed)' if resumed else ''}"
        )

        translates = objective(cfg.model.family).translates
        live = None if translates else live_eval.from_prepared(cfg, prepared, args.features)
        b = prepared.b
        job = tune.SweepJob(
            base_raw=cfg.to_dict(),  # the resolved params (storage root anchored at the repository root)
            keys=list(parsed),
            data=common.ship_data(
                cfg,
                "tune",
                runtime.WorkerData.ship(
                    prepared.x_train,
                    y=prepared.y_train,
                    num_classes=prepared.manifest["classes"],
                    x_b=None if b is None else b.x_train,
                    heldout=prepared.x_val,  # a store by path, as x_train
                    heldout_y=prepared.y_val,
                ),
            ),
            live=live,
            tracking_uri=uri,
            experiment_id=exp_id,
            parent_run_id=parent,
            sweep_name=name,
            run_label=label,
            x_val_b=None if b is None else b.x_val,
            spill_path=str(common.spill_path(parent)),
        )
        try:
            results = tune.run_sweep(cfg, parsed, job, storage_path, fs, name)
        except KeyboardInterrupt:
            raise tracking.Interrupted("sweep interrupted; rerun the same command to resume it") from None
        except Exception as e:
            raise RuntimeError(f"sweep failed: {e}") from None

        rows = tune.summarise(results, list(parsed), cfg)
        runs = tracking.child_runs(uri, exp_id, parent)
        for row in rows:
            row["mlflow_run_id"] = runs.get(row["trial_id"])
            if row["mlflow_run_id"]:
                tags = {
                    tune.STATUS_TAG: row["status"],
                    **({"ganpipe.trial_error": row["error"]} if row["error"] else {}),
                }
                tracking.set_tags(uri, row["mlflow_run_id"], tags)
                tracking.end_run(uri, row["mlflow_run_id"], STATUS[row["status"]])
        best = tune.best_row(rows, cfg.tune.metric, cfg.tune.mode)
        if best is None:
            failed = [r for r in rows if r["status"] == "failed"]
            raise RuntimeError(
                f"every trial failed; the first: {failed[0]['error']}"
                if failed and len(failed) == len(rows)
                else f"no trial reported a finite {cfg.tune.metric} without collapsing or diverging; the nested runs "
                f"of the MLflow sweep run {parent} hold each trial's status and ganpipe.diagnosis"
            )

        out = Path(args.out)
        best_raw = redact_tree(deep_merge(raw, unflatten({k: best[k] for k in parsed})))
        best_yaml = yaml.safe_dump(best_raw, sort_keys=False)
        outputs.write_text(
            out / "best_params.yaml",
            "# the full params with the best trial's values merged in; apply with `ganpipe apply-best`\n" + best_yaml,
        )
        outputs.write_csv_atomic(out / "trials.csv", rows)
        _plot(rows, list(parsed), cfg.tune.metric, out / "results.png")
        tracking.log_summary_metrics(uri, parent, {f"best/{cfg.tune.metric}": best[cfg.tune.metric]})
        tracking.set_tags(uri, parent, {"ganpipe.best_trial": best["trial_id"]})
        tracking.log_artifacts(uri, parent, [out / "best_params.yaml", out / "trials.csv", out / "results.png"], "tune")
        tracking.end_run(uri, parent)
        common.deliver_spilled("tune", uri, common.spill_path(parent))
        counts = {s: sum(r["status"] == s for r in rows) for s in STATUS}
        print(
            f"[tune] {len(rows)} trials: {counts['finished']} finished, {counts['stopped_early']} stopped early, "
            f"{counts['failed']} failed" + (f", {counts['invalid']} invalid" if counts["invalid"] else "")
        )
        print(
            f"[tune] best trial {best['trial_id']}: {cfg.tune.metric}={best[cfg.tune.metric]:.4g} with "
            + ", ".join(f"{k}={best[k]}" for k in parsed)
        )
        print(
            f"[tune] wrote {out}/best_params.yaml, {out}/trials.csv, {out}/results.png; "
            "`ganpipe apply-best` puts the best values into params.yaml"
        )


def _plot(rows, keys, metric, path) -> None:
    from pipeline.io.plots import scatter_metric

    scatter_metric(rows, keys, metric, path)


if __name__ == "__main__":
    sys.exit(main())
