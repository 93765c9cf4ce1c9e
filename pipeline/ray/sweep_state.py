"""What a killed driver leaves of a sweep, made restorable.

Tune keeps each trial's newest checkpoints (`CheckpointConfig(num_to_keep)`) and deletes the older ones
the moment a new one is registered, but it snapshots the sweep (experiment_state-*.json) only every
10 s or so, a moment after. A driver killed between the two leaves a snapshot that names a checkpoint
no longer on storage; `Tuner.restore` then fails that trial ("Could not recover from checkpoint as it
does not exist on storage anymore"), though a newer checkpoint of it lies in its folder.

`repair_pruned_checkpoints` reads the newest snapshot with Tune's own loader and, for each trial to be
resumed whose named checkpoint is gone, copies the trial's newest checkpoint under that name. The trial
then resumes from its newest state: nothing it trained is redone and nothing it reported is reported
again. Local folders and S3 alike (any pyarrow filesystem).

`num_to_keep` costs: it also makes Tune snapshot the sweep after every trial checkpoint, and each
snapshot uploads the driver's whole staging folder (every trial's result.json, progress.csv, params.*),
so a sweep's uploads grow with trials x checkpoints x trials (on moto's S3, 111,828 requests by the 75th
trial of 256). Dropping it for a callback that deletes the older checkpoint was tried and reverted: the
snapshots then come every 10 s or more, and a trial whose first checkpoint came after the last one is
restored with none and trains (and reports to MLflow) again from step 0
(test_a_killed_driver_resumes_the_sweep_with_no_trial_lost_or_repeated caught it)."""

from __future__ import annotations

import re
import sys
from pathlib import PurePosixPath

CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def newest_checkpoint(fs, trial_dir: str) -> str | None:
    """The trial folder's checkpoint with the highest index (Tune names them checkpoint_000003), or None."""
    import pyarrow.fs as pafs

    entries = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    found = [(int(m.group(1)), e.path) for e in entries if (m := CHECKPOINT.match(PurePosixPath(e.path).name))]
    return max(found)[1] if found else None


def copy_checkpoint(fs, source: str, dest: str) -> None:
    """Copy the checkpoint folder `source` to `dest` on `fs` (a local disk or a bucket)."""
    import pyarrow.fs as pafs

    fs.create_dir(dest, recursive=True)  # (pyarrow copies into a local folder only if it is there)
    pafs.copy_files(source, dest, source_filesystem=fs, destination_filesystem=fs)


def repair_pruned_checkpoints(experiment_path: str, fs=None) -> list[str]:
    """Give every unfinished trial of the sweep at `experiment_path` (a path on `fs`; None: the local
    disk) the checkpoint its last snapshot names, copied from its newest one where Tune pruned it after
    the snapshot. Returns the ids of the trials repaired."""
    import pyarrow.fs as pafs

    try:  # Tune's private helpers (tested with the Ray of constraints.txt): another Ray may lack them
        from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
        from ray.tune.experiment.trial import Trial
        from ray.tune.utils.serialization import _loads_with_cloudpickle
    except ImportError as e:
        import ray

        print(
            f"[tune] warning: Ray {ray.__version__} lacks the Tune helpers that check the sweep's last snapshot "
            f"for pruned checkpoints ({e}); resuming without that check: a trial that checkpointed after the "
            "snapshot may fail to restore (constraints.txt names the Ray this was tested with)",
            file=sys.stderr,
            flush=True,
        )
        return []

    fs = fs or pafs.LocalFileSystem()
    snapshot = _find_newest_experiment_checkpoint(experiment_path, fs=fs)
    if snapshot is None:
        return []
    with fs.open_input_stream(snapshot) as f:
        state = _loads_with_cloudpickle(f.readall())
    repaired = []
    for trial_json, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.status == Trial.TERMINATED or trial.checkpoint is None:
            continue
        # where the checkpoint lies now: its own folder, or a PBT donor's, under this experiment path (the
        # snapshot holds the path the sweep had then, which may have moved)
        saved = PurePosixPath(trial.checkpoint.path)
        trial_dir = f"{experiment_path.rstrip('/')}/{saved.parent.name}"
        named = f"{trial_dir}/{saved.name}"
        if fs.get_file_info(named).type != pafs.FileType.NotFound:
            continue
        newest = newest_checkpoint(fs, trial_dir)
        if newest is None:
            continue  # nothing to resume from: Tune reports the trial's error as it is
        copy_checkpoint(fs, newest, named)
        repaired.append(trial.trial_id)
    return repaired
