"""The checkpoints a sweep keeps on storage, and what a killed driver leaves of them, made restorable.

Each trial keeps its newest checkpoint only: `prune_older_checkpoints` deletes the one before as soon as
Tune registers a new one. (Tune's own `CheckpointConfig(num_to_keep)` would do the same, but it then
forces a snapshot of the sweep after every trial checkpoint, and a snapshot uploads the sweep's whole
folder, every trial's files: O(trials) requests per checkpoint, so O(trials^2) per sweep, which on S3
took a 256-trial sweep to 111,828 requests by its 75th trial. Without it Tune snapshots every 10 s or
more, 5% of the time at most.) The sweep's last snapshot may therefore name a checkpoint deleted since;
`Tuner.restore` would then fail that trial ("Could not recover from checkpoint as it does not exist on
storage anymore"), though a newer checkpoint of it lies in its folder.

`repair_pruned_checkpoints` reads the newest snapshot with Tune's own loader and, for each trial to be
resumed whose named checkpoint is gone, copies the trial's newest checkpoint under that name. The trial
then resumes from its newest state: nothing it trained is redone and nothing it reported is reported
again. Local folders and S3 alike (any pyarrow filesystem)."""

from __future__ import annotations

import re
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


def prune_older_checkpoints():
    """A Tune callback that deletes a trial's previous checkpoint once Tune has its new one (on the
    driver; local disk or S3 alike). Only the trial's own: a checkpoint it was restored from that lies in
    another trial's folder (a PBT donor's) is never touched; PBT keeps its own few (num_to_keep)."""
    from ray.tune import Callback

    class PruneOlderCheckpoints(Callback):
        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
            older = trial.checkpoint  # the newest until now: Tune registers the new one after its callbacks
            if older is None or older.path == checkpoint.path:
                return
            if PurePosixPath(older.path).parent != PurePosixPath(checkpoint.path).parent:
                return
            try:
                older.filesystem.delete_dir(older.path)
            except (FileNotFoundError, OSError) as e:  # storage that is away costs space, never the sweep
                print(f"[tune] could not delete {older.path}: {e}", flush=True)

    return PruneOlderCheckpoints()


def repair_pruned_checkpoints(experiment_path: str, fs=None) -> list[str]:
    """Give every unfinished trial of the sweep at `experiment_path` (a path on `fs`; None: the local
    disk) the checkpoint its last snapshot names, copied from its newest one where Tune pruned it after
    the snapshot. Returns the ids of the trials repaired."""
    import pyarrow.fs as pafs
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

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
