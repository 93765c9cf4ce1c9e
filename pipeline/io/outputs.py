"""Writing stage outputs safely, and the facts about a run that outputs carry (git commit, models).

Outputs are written to a temporary sibling and renamed into place only when complete, so a failed
stage never leaves a half-written file or folder for DVC to cache.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipeline.core.objectives import build_generator

# default output locations; dvc.yaml passes them explicitly to each stage
PREPARED = "data/prepared"
MODELS = "models"
TRAIN_METRICS = "metrics/train.json"
DIAGNOSTICS = "metrics/diagnostics.json"
EVAL_METRICS = "metrics/eval.json"
PLOTS = "plots"
EXPORT = "export"
TUNE = "tune"
FEATURES = "data/features"
FEATURE_METRICS = "metrics/features.json"
RUN_RECORD = "run.json"  # in the models folder: MLflow run, Ray run, resumed / handed back, timings


def read_run_record(models: str | Path) -> dict[str, Any]:
    """The train stage's record of the run that produced `models` (see stages/train.py)."""
    return read_json(Path(models) / RUN_RECORD, "run the train stage first")


TMP_PREFIX = ".ganpipe-tmp-"  # temporary siblings of outputs; .gitignore keeps a crash's leftovers out of git


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` only if the block succeeds. Its files are flushed
    to disk before the rename that publishes them, so a crash leaves the old folder or the new one,
    never a half-written one; a temporary folder left by an earlier crash is removed."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{TMP_PREFIX}{path.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(path: str | Path) -> None:
    """A stage replaces its output folder whole, and an output folder holds files only: refuse (before
    any work) a path that is a file, the working folder or one above it, or a folder holding a folder
    (`--out data` would have deleted data/inputs, the user's own data)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path}: exists and is not a folder; give the stage an output folder")
    here, target = Path.cwd().resolve(), path.resolve()
    if target == here or target in here.parents:
        raise ValueError(f"{path}: is the working folder or holds it; give the stage an output folder of its own")
    sub = next((c.name for c in sorted(path.iterdir()) if c.is_dir()), None)
    if sub is not None:
        raise ValueError(
            f"{path}: holds the folder {sub}/, so it is not a stage's output (those hold files only) and "
            "replacing it would delete it; give the stage an output folder of its own"
        )


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary sibling, flushed to disk, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    _replace_atomically(Path(path), lambda tmp: tmp.write_text(text))


def write_csv_atomic(path: str | Path, rows: list[dict]) -> None:
    _replace_atomically(Path(path), lambda tmp: write_csv(tmp, rows))


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found ({what})")
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: not readable JSON ({gist(e)}); {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object; {what}")
    return data


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def git_commit(cwd: str | Path = ".") -> dict[str, Any]:
    """HEAD commit and whether the tree has uncommitted changes; nulls outside a git repo."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


class UnsafeFile(ValueError):
    """A file that holds more than tensors and plain data (it could run code when loaded)."""


class UnreadableFile(ValueError):
    """A file torch cannot read: truncated, or not one this project wrote. The message names it."""


def load_tensors(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load restricted to tensors and plain data (dicts, lists, numbers, strings): a file from
    shared storage (a checkpoint under storage.root, a model in a bucket) can be written by anyone
    with access to it, and a pickle may run code when loaded. Anything else is refused with one line
    naming the file."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFile(f"{path}: refused to load: it holds more than tensors and plain data ({gist(e)})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # torch's words for a truncated or foreign file (RuntimeError, KeyError...) name no file
        raise UnreadableFile(
            f"{path}: cannot be read ({gist(e)}): it is truncated or not a file this project wrote"
        ) from None


def gist(e: BaseException) -> str:
    """An exception's first line (at most 200 characters), or its type's name: for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def save_generator(G: torch.nn.Module, spec: dict[str, Any], path: Path, ema: bool) -> None:
    torch.save({"spec": spec, "state_dict": G.state_dict(), "ema": ema}, path)


def load_generator(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the generator from its own file (no training config needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the train stage first (dvc repro train)")
    blob = load_tensors(path)
    try:
        G = build_generator(blob["spec"])
        G.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a generator saved by the train stage ({gist(e)}); rerun train") from None
    return G.eval(), blob["spec"]
