"""What a run *is*: the one place that says which params and which source files shape results.

A training run, a sweep and a trial are identified by
  - the result-shaping params (`TRAIN_PARAMS`, `TUNE_PARAMS`): everything that changes the numbers;
  - the content hash of the prepared data;
  - a fingerprint of the source files that shape results (`TRAIN_SOURCES`, `TUNE_SOURCES`).
A finished run is handed back only when all three match; an interrupted run with the same identity
resumes. The same lists are the `params` and code `deps` of the train and tune stages in dvc.yaml
(a test keeps the two equal), so DVC reruns a stage exactly when its identity may have changed.

Operational keys (`OPERATIONAL`: logging and checkpoint cadence, checkpoints kept, workers and CPUs
per worker, failures allowed, GPU choice) decide where and how a run executes, not its numbers: they
are in neither list, so changing them reruns no stage and never restarts a training from step 0.

The source fingerprint hashes each file's syntax tree without comments, docstrings or formatting:
an edit that changes behaviour gives a new identity, a comment or a reflow does not.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

# source files (relative to the repository root) whose behaviour shapes a training's numbers
TRAIN_SOURCES = (
    "stages/train.py",
    "pipeline/core/training.py",
    "pipeline/core/models.py",
    "pipeline/core/layers.py",
    "pipeline/core/objectives.py",
    "pipeline/core/steps.py",
    "pipeline/core/resnet.py",
    "pipeline/core/losses.py",
    "pipeline/core/datasets",  # a folder: every module in it (the datasets' known-answer metrics)
    "pipeline/core/cyclegan.py",
    "pipeline/ray/distributed.py",
    "pipeline/ray/runtime.py",
    "pipeline/core/live_eval.py",
    "pipeline/core/augment.py",
    "pipeline/core/metrics2d.py",
    "pipeline/core/metrics_image.py",
    "pipeline/core/features.py",
    "pipeline/core/draws.py",
    "pipeline/core/collectives.py",
    "pipeline/core/monitor.py",
)
TUNE_SOURCES = tuple(s for s in TRAIN_SOURCES if s != "stages/train.py") + ("stages/tune.py", "pipeline/ray/tune.py")

# what the train and tune stages import that does not shape their numbers (a test requires every
# other module they import, directly or not, to be in TRAIN_SOURCES / TUNE_SOURCES)
NOT_RESULT_SHAPING = {
    "pipeline/core/config.py": "the params schema: the values reach the identity as params",
    "pipeline/core/data.py": "the prepared data reach the identity by their content hash",
    "pipeline/core/environment.py": "sets environment variables for a block",
    "pipeline/core/extras.py": "says which optional package to install",
    "pipeline/core/identity.py": "computes the identity",
    "pipeline/io/lease.py": "who may run a run at a time",
    "pipeline/io/outputs.py": "writes files",
    "pipeline/io/plots.py": "draws plots",
    "pipeline/core/protocol.py": "names how figures are measured; the extractor's hash enters the identity as a value",
    "pipeline/io/s3.py": "storage I/O",
    "pipeline/io/unchanged_uploads.py": "storage I/O: skips re-sending bytes the store has",
    "pipeline/core/secrets.py": "redaction",
    "pipeline/io/store_shipping.py": "moves the prepared store to the nodes, verified by hash (not what it holds)",
    "pipeline/ray/sweep_state.py": "makes a killed sweep's state restorable (which checkpoint, not what it holds)",
    "pipeline/io/tracking.py": "MLflow",
    "stages/common.py": "paths, Ray start-up, the tracking URI",
    **{f"{pkg}/__init__.py": "a docstring" for pkg in ("pipeline/core", "pipeline/io", "pipeline/ray", "stages")},
}

# train.* keys that decide where and how a run executes; every other train.* key shapes results
OPERATIONAL = (
    "train.num_workers",
    "train.cpus_per_worker",
    "train.use_gpu",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_failures",
    "train.log_every",
)
# the result-shaping train.* keys, in params.yaml's order
TRAIN_RESULT_KEYS = (
    "train.steps",
    "train.batch_size",
    "train.lr_g",
    "train.lr_d",
    "train.betas",
    "train.lr_decay",
    "train.n_critic",
    "train.update",
    "train.precision",
    "train.channels_last",
    "train.deterministic",
    "train.ema",
    "train.augment",
    "train.ada",
    "train.pool_size",
    "train.monitor_every",
    "train.on_divergence",
    "train.rollback_lr_factor",
    "train.max_rollbacks",
)
TRAIN_PARAMS = ("seed", "model", "loss", *TRAIN_RESULT_KEYS, "eval.every", "eval.live_samples")
# a sweep also depends on its report cadence (ASHA's rungs, PBT's perturbation interval) and on tune.*
TUNE_PARAMS = ("seed", "model", "loss", *TRAIN_RESULT_KEYS, "train.checkpoint_every", "tune", "eval.live_samples")


def pick(params: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """{dotted key: value} for each key, a whole section when the key names one."""
    out = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def code_hash(source: str) -> str:
    """Hash of a Python source's behaviour: its syntax tree without comments, docstrings and layout."""
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def source_fingerprint(root: str | Path, sources: tuple[str, ...]) -> str:
    """One hash over the behaviour of every file in `sources` (paths relative to `root`;
    a folder stands for its .py files). Raises FileNotFoundError naming a missing file."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in sorted(expand(root, sources)):
        h.update(f"{rel}\0{code_hash((root / rel).read_text())}\0".encode())
    return h.hexdigest()


def expand(root: str | Path, sources: tuple[str, ...]) -> list[str]:
    """The files of `sources`: a folder stands for every .py file under it. Raises FileNotFoundError
    naming a missing source."""
    root = Path(root)
    out = []
    for rel in sources:
        path = root / rel
        if path.is_dir():
            out += sorted(p.relative_to(root).as_posix() for p in path.rglob("*.py"))
        elif path.is_file():
            out.append(rel)
        else:
            raise FileNotFoundError(f"{path}: a source file of the run identity is missing")
    return out


CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout whose code is running (pipeline/core/..)


def code_fingerprint(sources: tuple[str, ...]) -> str:
    """The fingerprint of the running checkout's `sources`."""
    return source_fingerprint(CODE_ROOT, sources)


def identity(
    params: dict[str, Any], keys: tuple[str, ...], data_hash: str, code: str, extractor: str | None = None
) -> dict[str, Any]:
    """The identity record: the result params, the data hash and the code fingerprint, and the hash of
    the feature extractor that scores the in-training evaluations of images (pipeline.core.protocol)."""
    ident = {"params": pick(params, keys), "data_hash": data_hash, "code": code}
    return {**ident, "extractor": extractor} if extractor else ident


def key(ident: dict[str, Any]) -> str:
    """Short stable hash of an identity record (names the Ray run and finds the MLflow run)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
