"""Hyperparameter search on Ray Tune, tracked as one MLflow sweep (a parent run, a nested run per trial).

The search space (`tune.search_space`) maps dotted params keys to one distribution each:

    tune:
      search_space:
        train.lr_g: {loguniform: [0.0001, 0.01]}
        train.lr_d: {uniform: [0.0001, 0.002]}
        model.hidden: {choice: [64, 128, 256]}
        train.n_critic: {randint: [1, 5]}      # low inclusive, high exclusive
        loss.name: {grid: [nonsaturating, hinge]}   # every value, times num_samples

It is checked before anything starts: every key must be a params key, every range non-empty, and
every value it can produce must give a valid config. A single-worker trial runs the training loop
directly in the trial (the cheap path), reports the in-training metrics (live_eval) at every
checkpoint tick, and saves a checkpoint there; ASHA stops poor trials early, PBT copies a donor's
checkpoint and mutates the continuous keys (the optimizers take the new learning rates after the
restore). A multi-worker trial (train.num_workers > 1) fits a Ray Train TorchTrainer from the trial,
whose reports reach Tune through a callback (ASHA works; PBT needs single-worker trials).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from pipeline.core import data, datasets, environment, extras, metrics_image, monitor
from pipeline.core.config import Config, ConfigError, build_config, deep_merge, flatten, unflatten
from pipeline.core.objectives import objective
from pipeline.ray import distributed, runtime, sweep_state
from pipeline.ray.runtime import WorkerData

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
CONTINUOUS = ("uniform", "loguniform")
TRIAL_TAG = "ganpipe.trial_id"
STATUS_TAG = "ganpipe.trial_status"
LIVE_METRICS = (
    *dict.fromkeys(m for name in datasets.DATASETS for m in datasets.point_metric_names(name)),
    *metrics_image.metric_names(live=True, conditional=True),
)
REPORTED = ("step", *LIVE_METRICS, "cycle_l1", "loss/D", "loss/G", "loss/cycle", "opt/lr_g", "opt/lr_d")
METRICS = (*LIVE_METRICS, "cycle_l1", "loss/D", "loss/G", "loss/cycle")


# ---- the search space: parsed and validated, pure ---------------------------------------------


def parse_space(space: dict[str, Any], base_raw: dict[str, Any]) -> dict[str, tuple[str, list]]:
    """{key: (distribution, args)}; raises ConfigError naming every bad key at once."""
    if not space:
        raise ConfigError(
            "tune.search_space: empty; give at least one key, e.g. train.lr_g: {loguniform: [0.0001, 0.01]}"
        )
    from pipeline.core import identity

    known = flatten(build_config(base_raw).to_dict())
    parsed, errors = {}, []
    for key, spec in space.items():
        where = f"tune.search_space.{key}"
        if key not in known:
            errors.append(f"{where}: unknown params key")
            continue
        if not any(key == p or key.startswith(f"{p}.") for p in identity.TRAIN_PARAMS):
            # tune.*, tracking.*, storage.*, data.*, operational train.* keys: a trial never reads them
            # (its value would do nothing, and would be printed and written to tune/trials.csv as given)
            errors.append(
                f"{where}: not a key a trial's training reads; search seed, model.*, loss.*, train.* "
                "(but not where it runs: num_workers, checkpoint_every...) or eval.every / eval.live_samples"
            )
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            errors.append(f"{where}: must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
            continue
        dist, args = next(iter(spec.items()))
        problem = _check_args(dist, args)
        if problem is None:
            problem = _check_values(key, _extremes(dist, args), base_raw)
        if problem:
            errors.append(f"{where}: {problem}")
        else:
            parsed[key] = (dist, list(args))
    if errors:
        raise ConfigError("\n".join(errors))
    return parsed


def _check_args(dist: str, args: Any) -> str | None:
    if not isinstance(args, list) or not args:
        return f"{dist} needs a non-empty list, got {args!r}"
    if dist in ("choice", "grid"):
        return None
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        return f"{dist} needs [low, high] numbers, got {args!r}"
    low, high = args
    if not low < high:
        return f"{dist} range is empty: low {low} must be < high {high}"
    if dist == "loguniform" and low <= 0:
        return f"loguniform needs low > 0, got {low}"
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        return f"randint needs integers, got {args!r}"
    return None


def _extremes(dist: str, args: list) -> list:
    if dist in ("choice", "grid"):
        return list(args)
    if dist == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def _check_values(key: str, values: list, base_raw: dict[str, Any]) -> str | None:
    for v in values:
        try:
            build_config(deep_merge(base_raw, unflatten({key: v})))
        except ConfigError as e:
            return f"value {v!r} gives an invalid config ({str(e).splitlines()[0]})"
    return None


MAX_COMBINATIONS = 4096  # finite spaces up to this many combinations are checked whole before a sweep


def invalid_combinations(parsed: dict[str, tuple[str, list]], base_raw: dict[str, Any]) -> list[tuple[dict, str]]:
    """The combinations of the space's `choice` and `grid` keys that give an invalid config, each with
    the config's first error line (each value alone was checked by `parse_space`; a method search, such
    as loss x d_norm, can still combine two valid values into an invalid run). Raises ConfigError when
    no combination is valid; skipped (returns []) when there are more than MAX_COMBINATIONS."""
    import itertools

    finite = {k: args for k, (dist, args) in parsed.items() if dist in ("choice", "grid")}
    if len(finite) < 2 or math.prod(len(v) for v in finite.values()) > MAX_COMBINATIONS:
        return []
    bad = []
    combos = [dict(zip(finite, values)) for values in itertools.product(*finite.values())]
    for combo in combos:
        try:
            build_config(deep_merge(base_raw, unflatten(combo)))
        except ConfigError as e:
            bad.append((combo, str(e).splitlines()[0]))
    if len(bad) == len(combos):
        raise ConfigError(
            f"tune.search_space: no combination of {', '.join(finite)} gives a valid config; e.g. "
            f"{_combo(bad[0][0])}: {bad[0][1]}"
        )
    return bad


def _combo(combo: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in combo.items())


def invalid_note(bad: list[tuple[dict, str]], parsed: dict[str, tuple[str, list]]) -> str:
    """The line the tune stage prints before a sweep whose space holds invalid combinations."""
    combo, why = bad[0]
    total = math.prod(len(parsed[k][1]) for k in combo)
    return (
        f"{len(bad)} of {total} combinations of the search space give an invalid config (e.g. {_combo(combo)}: "
        f"{why}); their trials are recorded as invalid and train nothing"
    )


class InvalidTrial(ConfigError):
    """A trial's sampled values combine into an invalid config: recorded as `invalid`, never trained."""


def plain(value: Any) -> Any:
    """A sampled value as the Python type params hold (Ray and Optuna may hand numpy scalars, which
    the strict params schema refuses)."""
    return value.item() if isinstance(value, np.generic) else value


def ray_space(parsed: dict[str, tuple[str, list]]) -> dict[str, Any]:
    from ray import tune

    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
    }
    return {key: make[dist](args) for key, (dist, args) in parsed.items()}


# ---- one trial --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SweepJob:
    """What every trial needs (plain data, shipped once through Ray's object store)."""

    base_raw: dict[str, Any]  # the resolved params every trial starts from
    keys: list[str]  # the searched params keys
    data: WorkerData  # what a trial trains on (the validation split as the monitor's held-out reals)
    live: Any  # live_eval.LiveEval: the metrics every report carries
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str = "sweep"  # multi-worker trials name their Ray Train runs after it
    run_label: str = "sweep"  # the sweep's MLflow run name: trials are named after it and their index
    x_val_b: np.ndarray | None = None  # CycleGAN: domain B's validation images (its cycle_l1, with heldout)
    spill_path: str | None = None  # where trials keep metrics the MLflow server never took


def cycle_metrics(G: torch.nn.Module, cfg: Config, x_val: np.ndarray, x_val_b: np.ndarray, n: int) -> dict[str, float]:
    """The cheap in-training evaluation of a CycleGAN trial: the mean cycle reconstruction error (L1)
    of both directions on validation images."""
    from pipeline.core import cyclegan

    errs = [
        cyclegan.cycle_diagnostics(f, b, v[:n], cfg.seed)["cycle_l1"]
        for f, b, v in ((G.xy, G.yx, x_val), (G.yx, G.xy, x_val_b))
    ]
    return {"cycle_l1": float(np.mean(errs))}


def trial_run_name(job: SweepJob, trial_name: str) -> str:
    """A trial's MLflow run name: its sweep's, then the trial's index (Tune names trials `..._00003`)."""
    return f"{job.run_label}-{trial_name.rsplit('_', 1)[-1]}"


def trial_tags(job: SweepJob, overrides: dict[str, Any]) -> dict[str, str]:
    """A trial's identity: its sweep's (params, data, code: in the sweep name) and its sampled values."""
    from pipeline.core import identity

    return {"ganpipe.identity": identity.key({"sweep": job.sweep_name, "trial": overrides})}


def own_checkpoint(checkpoint, trial_id: str) -> bool:
    """Whether a trial restores from a checkpoint of its own (Tune keeps them in a folder named with the
    trial's id), not from a PBT donor's or none."""
    return checkpoint is not None and trial_id in PurePosixPath(checkpoint.path).parent.name


def run_trial(config: dict[str, Any], job: SweepJob) -> None:
    """The Tune trainable: build, restore (own or PBT donor's checkpoint), train, report per tick."""
    from ray import tune

    from pipeline.core import training
    from pipeline.io import tracking

    overrides = {k: plain(config[k]) for k in job.keys}
    try:
        cfg = build_config(deep_merge(job.base_raw, unflatten(overrides)))
    except ConfigError as e:  # a combination of valid values that is not (see invalid_combinations)
        raise InvalidTrial(f"{_combo(overrides)}: {str(e).splitlines()[0]}") from None
    if cfg.train.num_workers > 1:
        return _fit_trial(cfg, overrides, job)
    distributed.check_tracking_here(job.tracking_uri, "the trial")
    worker = runtime.Worker(cfg, job.data, runtime.tune_session())
    ctx = tune.get_context()
    run_id = tracking.nested_run(
        job.tracking_uri,
        job.experiment_id,
        job.parent_run_id,
        ctx.get_trial_id(),
        trial_run_name(job, ctx.get_trial_name()),
        overrides,
        {**trial_tags(job, overrides), "ganpipe.node": distributed.node_id()},
    )
    hp = {f"hp/{k}": float(v) for k, v in overrides.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    last: dict[str, float] = {}
    # metrics go to MLflow from a background thread: a server that is away for a while delays
    # nothing, and what it never takes is kept in `job.spill_path` (see tracking.MetricBuffer)
    sent = tracking.MetricBuffer(job.tracking_uri, run_id, job.spill_path, cfg.tracking.flush_timeout_s)
    tagged = [-1]  # the events the trial's MLflow run was last tagged with (-1: not yet: `healthy` is a verdict too)
    # restored from its own checkpoint (a retry, a sweep resumed after its driver died) or started again
    # from none (its driver died before the sweep's snapshot named its first checkpoint), the trial trains
    # again steps its run may have: those go to MLflow once. Restored at the last step (also a PBT exploit
    # of a finished donor), its final report goes only if the run lacks it. The steps after a donor's
    # checkpoint (PBT) are new training: all of them are sent.
    checkpoint = worker.session.checkpoint
    own = checkpoint is None or own_checkpoint(checkpoint, ctx.get_trial_id())
    start = worker.gan.step  # the step it restored (0: a fresh trial)
    logged = tracking.last_step(job.tracking_uri, run_id, "opt/lr_g") if worker.finished or own else None

    def on_log(step: int, stats: dict[str, float]) -> None:
        last.update(stats)

    def diagnose(g: training.GAN) -> dict[str, str]:
        report = g.monitor.report()
        if len(report["events"]) != tagged[0]:  # new events: tag the trial's run
            tag_quietly(job.tracking_uri, run_id, monitor.tags(report))
            tagged[0] = len(report["events"])
        return {"diagnosis": report["verdict"], "severe": ",".join(report["severe"])}

    def on_checkpoint(g: training.GAN, final: bool) -> None:
        G = g.G_ema if g.G_ema is not None else g.G
        metrics = {"step": g.step, **{k: v for k, v in last.items() if k.startswith("loss/")}}
        # the steps this process trained (Tune's iterations_since_restore, in steps): what a restart cost
        metrics["steps_since_restore"] = g.step - start
        # the learning rates the optimizers really use (after a PBT exploit: the mutated ones)
        metrics["opt/lr_g"], metrics["opt/lr_d"] = g.opt_g.param_groups[0]["lr"], g.opt_d.param_groups[0]["lr"]
        if objective(cfg.model.family).translates:  # no latents to sample: the translations' cycle error
            x_val = data.unship(job.data.heldout)
            metrics.update(cycle_metrics(G, cfg, x_val, job.x_val_b, cfg.eval.live_samples))
        else:
            metrics.update(job.live(G, cfg.model.z_dim))
        if logged is None or g.step > logged:  # each report once in MLflow
            sent.add(g.step, {**metrics, **hp})
            sent.flush()
            # in MLflow before Tune sees the report (and may stop the trial), unless the server is away
            sent.wait_sent(2.0)
        metrics.update(diagnose(g))  # the stopper ends a collapsed or diverged trial (stops_trial)
        worker.report(metrics)

    try:
        # restored at the last step (a PBT exploit of a finished donor): nothing is left to train, but
        # the trial's own table still ends on its final step and metrics
        worker.run(training.Hooks(on_log=on_log, on_checkpoint=on_checkpoint))
    finally:
        sent.close()


def _fit_trial(cfg: Config, overrides: dict[str, Any], job: SweepJob) -> None:
    """A multi-worker trial: a Ray Train run of its own (named after the sweep and the trial, so a
    resumed sweep resumes it too), evaluated at every checkpoint, reporting to Tune via a callback."""
    from ray import tune

    from pipeline.core import training
    from pipeline.io import tracking

    distributed.check_tracking_here(job.tracking_uri, "the trial")
    ctx = tune.get_context()
    run_id = tracking.nested_run(
        job.tracking_uri,
        job.experiment_id,
        job.parent_run_id,
        ctx.get_trial_id(),
        trial_run_name(job, ctx.get_trial_name()),
        overrides,
        trial_tags(job, overrides),
    )
    every = build_config(deep_merge(cfg.to_dict(), {"eval": {"every": cfg.train.checkpoint_every}}))
    state, _ = distributed.fit(
        every,
        job.data,
        tracking_uri=job.tracking_uri,
        run_id=run_id,
        name=f"{job.sweep_name}-{ctx.get_trial_id()}",
        live=job.live,
        callbacks=[_train_to_tune()],
    )
    tag_quietly(job.tracking_uri, run_id, monitor.tags(training.diagnosis(cfg, state)))


def _train_to_tune():
    """Ray Train's TuneReportCallback, with the workers' `val/` metric names as Tune sees them from
    single-worker trials (`w1`, `fid`, ...)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            renamed = [{k.removeprefix("val/"): v for k, v in m.items()} for m in metrics]
            super().after_report(run_context, renamed, checkpoint)

    return Report()


# ---- the sweep --------------------------------------------------------------------------------


def check_search(cfg: Config, parsed: dict[str, tuple[str, list]]) -> None:
    """What the scheduler and the search algorithm need of the space: checked before Ray starts and
    before the sweep's MLflow run is opened."""
    if cfg.tune.scheduler == "pbt" and not any(d in CONTINUOUS for d, _ in parsed.values()):
        raise ConfigError("tune.scheduler: pbt needs at least one uniform or loguniform key to mutate")
    if cfg.tune.search_alg == "optuna" and any(d == "grid" for d, _ in parsed.values()):
        raise ConfigError("tune.search_alg: optuna does not take grid keys; use choice instead of grid")


def scheduler(cfg: Config, parsed: dict[str, tuple[str, list]]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.train
    if cfg.tune.scheduler == "asha":
        # trials report at every checkpoint and at the last step: no rung before the first report,
        # none past the end (a checkpoint interval longer than the run means one report, at the end)
        grace = min(max(t.checkpoint_every, t.steps // 4), t.steps)
        return ASHAScheduler(time_attr="step", max_t=t.steps, grace_period=grace, reduction_factor=2)
    if cfg.tune.scheduler == "pbt":
        from ray import tune

        mutations = {
            k: (tune.loguniform if d == "loguniform" else tune.uniform)(*a)
            for k, (d, a) in parsed.items()
            if d in CONTINUOUS
        }
        return PopulationBasedTraining(
            time_attr="step", perturbation_interval=t.checkpoint_every, hyperparam_mutations=mutations
        )
    return FIFOScheduler()


def search_alg(cfg: Config, parsed: dict[str, tuple[str, list]]):
    if cfg.tune.search_alg == "random":
        from ray.tune.search import BasicVariantGenerator

        # random sampling (and every grid value), seeded: the same params draw the same trials
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.tune.max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.seed)


def last_report(result) -> dict[str, Any]:
    """The trial's own last report. `result.metrics` belongs to the latest checkpoint, which after a
    PBT exploit is the donor's; the trial's progress table is its own."""
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and len(df):
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in df.iloc[-1].to_dict().items()}
    return dict(result.metrics or {})


# a trial's folder: run_trial_<id>_<n>_<sampled values>_<date>; the id is Tune's (c5f4d_00003 from the random
# search, 8 hex digits from a searcher such as Optuna), n its number in the sweep from 0
TRIAL_DIR = re.compile(r"^run_trial_(?P<id>[0-9a-f]+(?:_\d{5})?)_(?P<n>\d+)(?:_|$)")


def trial_id(result) -> str:
    """The trial id from the trial's folder name."""
    m = TRIAL_DIR.match(Path(result.path).name)
    return m["id"] if m else Path(result.path).name


def trial_number(result) -> int:
    """The trial's number in the sweep (its folder's), from 0: the order trials were created in."""
    m = TRIAL_DIR.match(Path(result.path).name)
    return int(m["n"]) if m else 0


def trial_status(result, steps: int) -> tuple[str, str | None]:
    """(finished | stopped_early | failed | invalid, error) for a Tune result."""
    if result.error is not None:
        err = result.error
        cause = getattr(err, "cause", None) or err
        status = "invalid" if isinstance(cause, InvalidTrial) or type(cause).__name__ == "InvalidTrial" else "failed"
        return status, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500]}"
    reached = last_report(result).get("step") or 0
    return ("finished" if reached >= steps else "stopped_early"), None


def check_tunable(cfg: Config) -> None:
    if cfg.train.num_workers > 1 and cfg.tune.scheduler == "pbt":
        raise ConfigError(
            "tune.scheduler: pbt exploits copy a trial's own checkpoint, which needs single-worker trials "
            f"(train.num_workers: 1), got train.num_workers {cfg.train.num_workers}; use asha or none"
        )
    if cfg.train.num_workers > 1 and objective(cfg.model.family).translates:
        raise ConfigError(
            f"train.num_workers: {cfg.model.family} trials run single-worker (their cycle_l1 is scored in the "
            f"trial), got {cfg.train.num_workers}"
        )
    if cfg.tune.metric not in METRICS:
        raise ConfigError(f"tune.metric: must be one the trials report ({', '.join(METRICS)}), got {cfg.tune.metric!r}")
    check_metric(cfg, datasets.kind(cfg.data.name))
    if cfg.tune.search_alg == "optuna":  # before Ray starts
        extras.need("optuna", "optuna", "tune.search_alg: optuna")


def reported_metrics(cfg: Config, kind: str | None) -> tuple[str, ...]:
    """What the trials of this config report on data of `kind` (points | images; None: not known
    before prepare, an npz)."""
    losses = ("loss/D", "loss/G")
    if objective(cfg.model.family).translates:
        return ("cycle_l1", *losses, "loss/cycle")
    if kind == "points":
        return (*datasets.point_metric_names(cfg.data.name), *losses)
    if kind == "images":
        return (*metrics_image.metric_names(live=True, conditional=cfg.model.conditional), *losses)
    return METRICS


def check_metric(cfg: Config, kind: str | None) -> None:
    """Refuse a tune.metric the trials will never report (before any trial: a sweep would otherwise
    run to the end and find no score)."""
    reported = reported_metrics(cfg, kind)
    if cfg.tune.metric not in reported:
        what = cfg.model.family if objective(cfg.model.family).translates else f"{cfg.data.name} ({kind})"
        raise ConfigError(f"tune.metric: trials on {what} report {', '.join(reported)}; got {cfg.tune.metric!r}")


def trial_gpus(cfg: Config) -> bool:
    """Single-worker trials take one GPU each when `train.use_gpu` (resolved on this cluster) says
    so; multi-worker trials resolve it in their own Ray Train run."""
    import ray

    from pipeline.ray.distributed import plan_gpu

    use, note = plan_gpu(cfg.train.use_gpu, 1, ray.cluster_resources().get("GPU", 0))
    if note:
        print(f"[tune] {note}", flush=True)
    return use


def sweep_name(cfg: Config, identity_key: str) -> str:
    """The sweep's Ray experiment name, from its run identity (pipeline.core.identity, TUNE_PARAMS)."""
    return f"ganpipe-tune-{cfg.data.name}-{identity_key}"


def run_sweep(cfg: Config, parsed, job: SweepJob, storage_path: str, fs, name: str, callbacks=None):
    """Fit the sweep (or resume it, finishing only what was left); returns Tune's ResultGrid.
    `callbacks`: extra Tune callbacks (the benchmark times trials with one)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    check_search(cfg, parsed)
    # a single-worker trial trains in the trial itself (its CPUs); a multi-worker trial only drives a
    # Ray Train run, whose workers ask for their own CPUs
    t = cfg.train
    # (Tune refuses an empty request: the driver asks for one byte of memory instead of a CPU)
    need = {"cpu": t.cpus_per_worker} if t.num_workers == 1 else {"cpu": 0, "memory": 1}
    if t.num_workers == 1 and trial_gpus(cfg):
        need["gpu"] = 1
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), need)
    path = os.path.join(storage_path, name)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[tune] resuming the sweep at {path}: finished trials are kept", flush=True)
        repaired = sweep_state.repair_pruned_checkpoints(path, fs)
        if repaired:
            print(
                f"[tune] {len(repaired)} trial(s) checkpointed after the sweep's last snapshot "
                f"({', '.join(repaired)}): they resume from their newest checkpoint",
                flush=True,
            )
        tuner = tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            storage_filesystem=fs,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=ray_space(parsed),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                scheduler=scheduler(cfg, parsed),
                search_alg=search_alg(cfg, parsed),
                num_samples=cfg.tune.num_samples,
                # the random search generator limits itself (Tune would warn and ignore this)
                max_concurrent_trials=None if cfg.tune.search_alg == "random" else cfg.tune.max_concurrent,
                reuse_actors=True,  # a trial starts in a warm process: imports and MLflow client kept
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=fs,
                verbose=0,
                # result.json only (what Tune restores and reads results from): its CSV and TensorBoard
                # copies of each trial's reports (MLflow has the curves) are two more files in every
                # trial folder, and every sweep snapshot uploads them all again
                callbacks=[progress_callback(cfg), JsonLoggerCallback(), *(callbacks or [])],
                stop=diagnosis_stopper(),
                # a trial whose process or node dies starts again from its last checkpoint, elsewhere if
                # need be (so does one that fails for its own reasons: a NaN fails again)
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
                # PBT copies a donor's checkpoint a tick later: keep a few, not just the newest
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if cfg.tune.scheduler == "pbt" else 1),
            ),
        )
    # Ctrl-C must stop the stage as an interruption (non-zero exit, no tune/ outputs for DVC to cache, a
    # rerun resumes from the sweep's snapshot); Tune's own handler would end fit() as if the sweep were
    # done, with the trials it had so far
    quiet = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_DISABLE_SIGINT_HANDLER": "1"}
    with environment.temporarily(quiet):
        return tuner.fit()


def tag_quietly(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tag a trial's MLflow run; a server that is away costs the tags (the verdict stays in the trial's
    reports and trials.csv), never the trial."""
    from pipeline.io import tracking

    try:
        tracking.set_tags(uri, run_id, tags)
    except Exception as e:
        if not (tracking.is_server_error(e) or isinstance(e, OSError)):
            raise
        print(f"[tune] MLflow at {tracking.redact(uri)} did not take the trial's verdict tags: {e}", flush=True)


def stops_trial(result: dict[str, Any]) -> bool:
    """A trial with a severe problem standing (its reports' `severe`: a mode collapse, or a divergence no
    rollback followed; monitor.Monitor.severe) is stopped: its remaining steps would be wasted."""
    return bool(result.get("severe"))


def diagnosis_stopper():
    """The Tune stopper for `stops_trial` (Ray imported here, when a sweep runs)."""
    from ray.tune import Stopper

    class DiagnosisStopper(Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return stops_trial(result)

        def stop_all(self) -> bool:
            return False

    return DiagnosisStopper()


def duration(seconds: float) -> str:
    """A short human duration: 42 s, 4.3 min, 1.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress_counts(statuses: list[str], total: int) -> dict[str, int]:
    """done / running / pending / failed over a sweep of `total` trials from Tune's trial statuses
    (TERMINATED, RUNNING, PAUSED, PENDING, ERROR); trials the search has not created yet are pending."""
    done, failed = statuses.count("TERMINATED"), statuses.count("ERROR")
    running = statuses.count("RUNNING") + statuses.count("PAUSED")  # PAUSED: a PBT trial between exploits
    return {"done": done, "running": running, "pending": max(total - done - failed - running, 0), "failed": failed}


def progress_line(
    index: int, total: int, trial: str, status: str, *, metric: str, value: Any, seconds: float | None,
    counts: dict[str, int], elapsed: float,
) -> str:  # fmt: skip
    """One line for a trial that ended: which, how, its metric, its time; then the sweep's counts and
    an ETA from the pace so far (elapsed time over trials ended, times trials left)."""
    shown = f"{metric}={value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else f"{metric}=-"
    took = f", {duration(seconds)}" if seconds is not None else ""
    ended = counts["done"] + counts["failed"]
    left = counts["running"] + counts["pending"]
    eta = f"ETA {duration(elapsed / ended * left)}" if ended and left else "ETA -" if left else "all ended"
    return (
        f"[tune] trial {index}/{total} {trial} {status}: {shown}{took} | {counts['done']} done, {counts['running']} "
        f"running, {counts['pending']} pending, {counts['failed']} failed | {eta}"
    )


def trial_position(trials: list, trial) -> int:
    """A trial's number in the sweep, from 1, as in tune/trials.csv: its place in the order the search
    created trials in (the `<n>` counter of their experiment tags, whatever their ids: a counter that
    skipped a value, as Optuna's can, leaves no gap), else its place in Tune's list."""

    def counter(t) -> int | None:
        head = str(getattr(t, "experiment_tag", "")).split("_", 1)[0]
        return int(head) if head.isdigit() else None

    mine = counter(trial)
    if mine is None:
        return trials.index(trial) + 1
    return 1 + sum(1 for t in trials if t is not trial and (c := counter(t)) is not None and c < mine)


def progress_callback(cfg: Config):
    """A Tune callback that prints one line per trial that finishes, is stopped or fails (the sweep runs
    with Tune's own output off), with the running counts and an ETA. Tune pickles its callbacks with the
    experiment's state, so a resumed sweep goes on printing."""
    import time

    from ray.tune import Callback

    # plain values only: Tune pickles the callback into the sweep's state, and the config holds the
    # tracking URI (with its credentials, if any)
    metric, steps, total, max_failures = cfg.tune.metric, cfg.train.steps, cfg.tune.num_samples, cfg.train.max_failures

    class Progress(Callback):
        def setup(self, total_num_samples: int | None = None, **info) -> None:
            # Tune's count: num_samples times the grid's combinations
            self.t0, self.started, self.total = time.monotonic(), {}, total_num_samples or total

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.started.setdefault(trial.trial_id, time.monotonic())

        def _ended(self, trials, trial, status: str) -> None:
            n = max(getattr(self, "total", total), len(trials))
            # the trial that ends may not carry its final status yet
            final = "ERROR" if status in ("failed", "invalid") else "TERMINATED"
            counts = progress_counts([final if t is trial else t.status for t in trials], n)
            last = trial.last_result or {}
            since = self.started.get(trial.trial_id)
            line = progress_line(
                trial_position(trials, trial),
                n,
                trial.trial_id,
                status,
                metric=metric,
                value=last.get(metric),
                seconds=None if since is None else time.monotonic() - since,
                counts=counts,
                elapsed=time.monotonic() - self.t0,
            )
            print(line, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            reached = (trial.last_result or {}).get("step") or 0
            severe = (trial.last_result or {}).get("severe")
            status = "finished" if reached >= steps else f"stopped early ({severe})" if severe else "stopped early"
            self._ended(trials, trial, status)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            attempt = getattr(getattr(trial, "run_metadata", None), "num_failures", 0)
            print(
                f"[tune] trial {trial_position(trials, trial)} {trial.trial_id} failed (its process, its node or its own error); "
                f"starting it again from its last checkpoint (failure {attempt} of train.max_failures "
                f"{max_failures})",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            try:  # the error's text, in the trial's local error file by now
                invalid = "InvalidTrial" in Path(trial.error_file).read_text()
            except Exception:  # the error is only for the line; never let it stop the sweep
                invalid = False
            self._ended(trials, trial, "invalid" if invalid else "failed")

    return Progress()


def summarise(results, keys: list[str], cfg: Config) -> list[dict[str, Any]]:
    """One row per trial, in trial order: its number (`trial`, 1..N: the x of `dvc plots`), id, status,
    sampled values, `score` (the final `tune.metric`: the y), final metrics, error."""
    rows = []
    for r in sorted(results, key=lambda r: (trial_number(r), trial_id(r))):
        status, error = trial_status(r, cfg.train.steps)
        m = last_report(r)
        row = {"trial": len(rows) + 1, "trial_id": trial_id(r), "status": status}
        # (a trial that died before its first report, its node lost with it, comes back with no config)
        row.update({k: plain((r.config or {}).get(k)) for k in keys})
        row["score"] = m.get(cfg.tune.metric)
        row.update({k: m.get(k) for k in REPORTED})
        row["diagnosis"], row["severe"] = m.get("diagnosis"), m.get("severe") or ""
        row["error"] = error
        rows.append(row)
    return rows


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial by its last reported `metric`: among finished trials if any, else stopped ones;
    never a failed one, nor one the stability monitor found collapsed or diverged."""
    scored = [
        r
        for r in rows
        if r["status"] not in ("failed", "invalid")
        and not r.get("severe")
        and isinstance(r.get(metric), (int, float))
        and math.isfinite(r[metric])
    ]
    finished = [r for r in scored if r["status"] == "finished"]
    scored = finished or scored
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric])
