"""How a figure was measured: the settings every evaluation metric carries, and the check that two
figures were measured alike before anything compares them.

FID, precision, recall, class modes, ... are only comparable when they come from the same feature
extractor (its weights' hash), against the same real split of the same size, with as many generated
samples drawn under the same seed. Users of other GAN libraries lose weeks to FIDs that were never
comparable; here every evaluation writes its protocol next to its numbers (metrics/eval.json, the
MLflow run's `ganpipe.protocol.*` tags, the model card), and `ganpipe promote` refuses to compare a
candidate with a champion measured otherwise, naming the difference. The run identity of a training
and of a sweep includes the extractor's hash (`extractor_hash`), so in-training figures scored in
another extractor are never resumed into or mixed with a sweep's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

TAG = "ganpipe.protocol."


def extractor_hash(path: str | Path) -> str | None:
    """sha256 (16 hex digits) of the extractor file's bytes; None when there is no such file (2D data)."""
    path = Path(path)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def of_evaluation(
    space: str, extractor: str | None, n_real: int, n_fake: int, seed: int, split: str = "val"
) -> dict[str, Any]:
    """The protocol of one evaluation: `space` is "points" or the extractor kind ("classifier",
    "random-init"); `extractor` its hash (None for points)."""
    return {
        "space": space,
        "extractor_sha256": extractor,
        "real_split": split,
        "n_real": int(n_real),
        "n_fake": int(n_fake),
        "seed": int(seed),
    }


def tags(protocol: dict[str, Any]) -> dict[str, str]:
    return {f"{TAG}{k}": str(v) for k, v in protocol.items()}


def from_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k[len(TAG) :]: v for k, v in tags.items() if k.startswith(TAG)}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key: a vs b` for every setting in which two protocols differ (a missing one counts)."""
    return [
        f"{k}: {a.get(k, 'unrecorded')} vs {b.get(k, 'unrecorded')}"
        for k in sorted(set(a) | set(b))
        if str(a.get(k, "unrecorded")) != str(b.get(k, "unrecorded"))
    ]
