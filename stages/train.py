"""train: fit the GAN under Ray Train (resuming an interrupted run), track it in MLflow, save models."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from pipeline.core import cyclegan, data, datasets, environment, identity, live_eval, monitor, protocol, training
from pipeline.core.config import flatten
from pipeline.core.objectives import Objective, build_generator, objective
from pipeline.io import outputs, plots, tracking
from pipeline.ray import distributed, runtime
from stages import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe train", __doc__)
    common.inputs(p, "--data", "--features")
    common.path(p, "--models", outputs.MODELS, "output folder for models")
    common.path(p, "--metrics", outputs.TRAIN_METRICS, "output metrics file")
    common.path(p, "--diagnostics", outputs.DIAGNOSTICS, "output: the stability monitor's verdict and events")
    args = p.parse_args(argv)
    return common.run(lambda: train(args))


def train(args) -> None:
    cfg = common.config(args)
    outputs.check_replaceable(args.models)  # now, not after the training
    common.check_locations(cfg, "storage.root")
    prepared = data.load_prepared(args.data)
    data_hash = prepared.manifest["content_hash"]
    data.check_fits_model(prepared.manifest, cfg.model.arch)  # an npz holds points or images
    if cfg.model.conditional and prepared.y_train is None:
        raise ValueError("model.conditional: the prepared data has no labels (an npz needs a 'y' array)")
    obj = objective(cfg.model.family)
    if obj.domains == 2 and prepared.b is None:
        raise ValueError(f"model.family: {obj.family} needs two domains; rerun prepare with data.target set")
    # the run identity (result params, data, code): the same identity resumes or hands back its Ray
    # run and MLflow run; any change to one of them starts a new run from step 0
    # images scored during training: the extractor's weights are part of what the run is
    scored = prepared.is_image and cfg.eval.every and not obj.translates
    extractor = protocol.extractor_hash(Path(args.features) / "extractor.pt") if scored else None
    ident = identity.identity(
        cfg.to_dict(), identity.TRAIN_PARAMS, data_hash, identity.code_fingerprint(identity.TRAIN_SOURCES), extractor
    )
    name = f"ganpipe-{cfg.data.name}-{identity.key(ident)}"
    uri = common.tracking_uri(cfg)
    print(f"[train] {common.start_ray(cfg, uri)}; {cfg.train.num_workers} worker(s)")
    # the Ray run lives at storage root + name; its MLflow run is found by that same address
    ray_run = distributed.run_address(cfg.storage.root, name)
    tags = tracking.lineage_tags(outputs.git_commit(), data_hash, cfg.fingerprint(), "train", common.portable(ray_run))
    tags.update(
        {"ganpipe.identity": identity.key(ident), "ganpipe.code": ident["code"][:16], **common.dvc_experiment()}
    )
    # one process at a time per run: a second one would resume, prune and overwrite its checkpoints
    with distributed.run_lease(cfg.storage.root, cfg.storage.s3_endpoint_url, name, f"the run {name}"):
        run_key = hashlib.sha256(ray_run.encode()).hexdigest()[:16]
        before = tracking.find_run(uri, cfg.tracking.experiment, run_key)
        run_id, resumed = tracking.start_or_resume_run(
            uri, cfg.tracking.experiment, run_key, common.run_label(cfg, identity.key(ident)), tags
        )
        # from here on the MLflow run is ended (FAILED, or KILLED on Ctrl-C) if the stage stops; a
        # finished run whose hand-back fails (its checkpoint unreadable, say) stays FINISHED
        finished = before is not None and before.info.status == "FINISHED"
        with tracking.closing_run(uri, run_id, finished), tracking.system_metrics(uri, run_id):
            _train_in_run(
                args,
                cfg,
                prepared,
                data_hash=data_hash,
                ident=ident,
                name=name,
                uri=uri,
                run_id=run_id,
                resumed=resumed,
                obj=obj,
            )


def _train_in_run(
    args,
    cfg,
    prepared,
    *,
    data_hash: str,
    ident: dict,
    name: str,
    uri: str,
    run_id: str,
    resumed: bool,
    obj: Objective,
) -> None:
    if resumed and common.dvc_experiment():  # the experiment that asked for the run this time
        tracking.set_tags(uri, run_id, common.dvc_experiment())
    tracking.log_params(uri, run_id, {**flatten(cfg.public_dict()), "data.content_hash": data_hash})
    tracking.log_dict(uri, run_id, {"config": cfg.public_dict(), "identity": ident}, "config.json")
    print(f"[train] MLflow run {run_id} ({'found' if resumed else 'new'}) at {tracking.redact(uri)}")

    # CycleGAN trials and runs are scored by the evaluate stage (translations are not sampled from z)
    live = live_eval.from_prepared(cfg, prepared, args.features) if cfg.eval.every and not obj.translates else None
    # metrics the server never took (it was away at the end of training) land here, on this machine
    spill = common.spill_path(run_id)
    t0 = time.perf_counter()
    try:
        shipped = runtime.WorkerData.ship(
            prepared.x_train,
            y=prepared.y_train,
            num_classes=prepared.manifest["classes"],
            x_b=prepared.b.x_train if obj.domains == 2 else None,
            heldout=prepared.x_val if obj.labels else None,  # the monitor's held-out reals
            heldout_y=prepared.y_val,
        )
        state, result_path = distributed.fit(
            cfg,
            common.ship_data(cfg, "train", shipped),
            tracking_uri=uri,
            run_id=run_id,
            name=name,
            live=live,
            spill_path=str(spill),
        )
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C (Ray's handler may turn it into SystemExit)
        at = distributed.latest_checkpoint_step(cfg.storage.root, cfg.storage.s3_endpoint_url, name)
        logged = tracking.last_step(uri, run_id, "loss/D")
        where = f"at step {logged} " if logged else ""
        resume = f"from its last checkpoint (step {at})" if at else "from step 0 (no checkpoint was written yet)"
        raise tracking.Interrupted(
            f"training interrupted {where}of {cfg.train.steps}; rerun (dvc repro) to resume {resume}"
        ) from None
    except Exception as e:
        raise RuntimeError(f"training failed: {e}") from None
    wall = time.perf_counter() - t0
    record = _run_record(state, run_id, uri, result_path, identity.key(ident), wall)

    use_ema = state["G_ema"] is not None
    G = build_generator(state["spec"])
    G.load_state_dict(state["G_ema"] if use_ema else state["G"])
    with outputs.atomic_dir(args.models) as tmp:
        outputs.save_generator(G, state["spec"], tmp / "generator.pt", ema=use_ema)
        import torch

        torch.save({"state_dict": state["D"]}, tmp / "discriminator.pt")
        outputs.write_csv(tmp / "history.csv", state["history"])
        outputs.write_csv(tmp / "evals.csv", state.get("evals", []))
        outputs.write_json(tmp / outputs.RUN_RECORD, record)
        spec = state["spec"]
        if obj.translates:  # x | G(x) | F(G(x)) | y | F(y) | G(F(y)) on validation images
            plots.image_grid(cyclegan.triplets(G, prepared.x_val, prepared.b.x_val), tmp / "samples.png", nrow=6)
        else:
            n = 64 if prepared.is_image else 1000
            samples = training.sample(G, n, spec["z_dim"], cfg.seed, num_classes=spec.get("num_classes"))
            _sample_plot(samples, prepared, cfg.data.name, tmp / "samples.png")
    final = state["history"][-1] if state["history"] else {}
    # metrics/train.json: numbers that diff meaningfully; the facts about this execution go to the
    # run record beside the model
    summary = {
        "steps": state["step"],
        "loss_D": final.get("loss/D"),
        "loss_G": final.get("loss/G"),
        **{"loss_" + k.removeprefix("loss/"): final.get(k) for k in obj.losses},
        "D_real": final.get("D/real"),
        "D_fake": final.get("D/fake"),
        # GAN training amplifies float rounding: equal numbers are promised on the same CPU kind only
        "machine": environment.machine_kind(),
    }
    outputs.write_json(args.metrics, summary)
    diagnosis = diagnostics(cfg, state)
    outputs.write_json(args.diagnostics, diagnosis)
    print(f"[train] stability: {diagnosis['verdict']}: {diagnosis['explanation']}" + _rollbacks(diagnosis))
    try:
        tracking.set_tags(uri, run_id, monitor.tags(diagnosis))
        tracking.log_dict(uri, run_id, training.diagnosis(cfg, state), "diagnostics.json")  # with the thresholds
        tracking.log_artifacts(uri, run_id, [args.models], "models")
        tracking.log_summary_metrics(
            uri, run_id, {"train/wall_time_s": record["trained_s"], "sys/restarts": record["restarts"]}, state["step"]
        )
        tracking.end_run(uri, run_id)
    except Exception as e:
        if not (tracking.is_server_error(e) or isinstance(e, OSError)):
            raise
        kept = f"; metrics it never took are in {spill}" if spill.is_file() else ""
        raise RuntimeError(
            f"the MLflow server at {tracking.redact(uri)} failed after training ({tracking.describe_error(e)}); "
            f"{args.models} and {args.metrics} are written and the finished run is kept{kept}. Rerun `dvc repro` "
            "when the server answers: it hands the run back and logs it"
        ) from None
    if record["handed_back"]:
        print(
            f"[train] reused finished run {run_id} (same params, data and code), trained in "
            f"{record['trained_s']:.0f} s on {record['finished_at'] or 'an earlier run'} -> {args.models}, {args.metrics}"
        )
    else:
        print(f"[train] done: {state['step']} steps in {wall:.1f}s -> {args.models}, {args.metrics}")
    common.deliver_spilled("train", uri, spill)


def diagnostics(cfg, state: dict) -> dict:
    """metrics/diagnostics.json: the stability monitor's verdict (`healthy` or the first problem
    found), its events (kind, step, evidence, explanation) and its last signals; the thresholds
    stay in the MLflow artifact (they are code, not a result)."""
    return {k: v for k, v in training.diagnosis(cfg, state).items() if k != "thresholds"}


def _rollbacks(diagnosis: dict) -> str:
    problems = [p for p in diagnosis["problems"] if p != diagnosis["verdict"]]
    more = f"; also {', '.join(problems)}" if problems else ""
    n = diagnosis["rollbacks"]
    return more + (f"; {n} rollback(s)" if n else "") + (" (metrics/diagnostics.json)" if diagnosis["events"] else "")


def _run_record(state: dict, run_id: str, uri: str, result_path: str, identity_key: str, wall: float) -> dict:
    """How this model came to be (models/run.json): where its runs are, whether this stage trained it,
    resumed it (from step `resumed_from`) or handed a finished run back, and the training time."""
    handed_back = bool(state.get("handed_back"))
    return {
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": common.portable(uri),
        "ray_result_path": common.portable(result_path),
        "identity": identity_key,
        "resumed": not handed_back and state.get("resumed_from", 0) > 0,
        "resumed_from": state.get("resumed_from", 0),
        "handed_back": handed_back,
        "restarts": state.get("restarts", 0),
        "trained_s": round(state.get("trained_s") or wall, 2),
        "finished_at": state.get("finished_at"),
        "wall_time_s": round(wall, 2),
        **common.dvc_experiment(),
    }


def _sample_plot(samples, prepared, dataset: str, path) -> None:
    if prepared.is_image:
        plots.image_grid(samples, path)
    else:
        plots.scatter_2d(samples, prepared.x_val[:2000], datasets.centers(dataset), path, "generated vs real")


if __name__ == "__main__":
    sys.exit(main())
