"""Model registry chores: promote a candidate to champion when it is better, sample a generator.

`promote` compares the evaluation metric logged on the candidate's training run with the
champion's and moves the `champion` alias only when the candidate wins (or there is no champion);
two evaluations measured under different protocols (pipeline.core.protocol) are refused, not compared.
`sample` draws from an exported ONNX generator, a local file or `models:/<name>@<alias>`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _metric(client, name: str, alias: str, metric: str) -> tuple[str, float | None, dict[str, str]]:
    """(version, the metric on its run, the protocol its evaluation was measured under)."""
    from pipeline.core import protocol

    version = client.get_model_version_by_alias(name, alias)
    run = client.get_run(version.run_id)
    return version.version, run.data.metrics.get(metric), protocol.from_tags(run.data.tags)


def promote(uri: str, name: str, metric: str, mode: str) -> tuple[bool, str]:
    """(promoted, reason). Raises ValueError when there is no candidate or it lacks the metric."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        cand_v, cand, cand_protocol = _metric(client, name, "candidate", metric)
    except MlflowException:
        raise ValueError(
            f"export.model_name: {name} has no version with alias 'candidate'; run the export stage"
        ) from None
    if cand is None or not math.isfinite(cand):
        raise ValueError(f"{name} version {cand_v} (candidate) has no metric {metric!r} on its run")
    try:
        champ_v, champ, champ_protocol = _metric(client, name, "champion", metric)
    except MlflowException:
        champ_v, champ, champ_protocol = None, None, {}
    better = champ is None or (cand < champ if mode == "min" else cand > champ)
    if champ_v == cand_v:
        return False, f"version {cand_v} is already the champion"
    if champ is not None and metric.startswith("eval/"):
        from pipeline.core import protocol

        diff = protocol.differences(cand_protocol, champ_protocol)
        if diff:
            raise ValueError(
                f"cannot compare {metric}: candidate version {cand_v} and champion version {champ_v} were "
                f"evaluated under different protocols ({'; '.join(diff)}); re-evaluate both the same way"
            )
    if not better:
        return False, (
            f"candidate version {cand_v} has {metric}={cand:.4g}, not better than champion "
            f"version {champ_v} with {champ:.4g} ({mode} wins); champion unchanged"
        )
    client.set_registered_model_alias(name, "champion", cand_v)
    was = "no champion before" if champ is None else f"champion was version {champ_v} with {champ:.4g}"
    return True, f"version {cand_v} is now champion: {metric}={cand:.4g} ({was})"


def resolve_onnx(model: str, uri: str | None = None) -> Path:
    """A local .onnx file for a file, an export folder or a models:/ URI."""
    if model.startswith("models:/"):
        import mlflow
        from mlflow.exceptions import MlflowException

        if uri:
            mlflow.set_tracking_uri(uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except MlflowException as e:
            first = (e.message.strip().splitlines() or [""])[0][:300]  # not a page of a proxy's HTML
            raise FileNotFoundError(f"{model}: {first}") from None
        found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not found:
            raise FileNotFoundError(f"{model}: no ONNX file in the logged model")
        return found[0]
    p = Path(model)
    if p.is_dir():
        p = p / "generator.onnx"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: generator not found (give an .onnx file, an export folder or models:/name@alias)"
        )
    return p


def sample(onnx_path: Path, n: int, seed: int, labels: list[int] | None = None) -> np.ndarray:
    """n samples from an exported generator (z ~ N(0, I) under `seed`; labels cycle for conditional ones)."""
    import onnxruntime as ort

    from pipeline.io.outputs import gist

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors (a corrupt or truncated file) are not ValueErrors
        raise ValueError(f"{onnx_path}: not a readable ONNX model ({gist(e)})") from None
    inputs = {i.name: i for i in sess.get_inputs()}
    if "z" not in inputs:
        raise ValueError(f"{onnx_path}: not a generator export (its inputs are {sorted(inputs)}, not z)")
    z_dim = inputs["z"].shape[1]
    feed = {"z": np.random.default_rng(seed).standard_normal((n, z_dim)).astype(np.float32)}
    if "y" in inputs:
        cycle = class_labels(sess.get_modelmeta().custom_metadata_map, labels, onnx_path)
        feed["y"] = np.array([cycle[i % len(cycle)] for i in range(n)], dtype=np.int64)
    elif labels is not None:
        raise ValueError("--labels: this generator is unconditional (it takes z only)")
    return sess.run(None, feed)[0]


def class_labels(meta: dict[str, str], labels: list[int] | None, where: Path) -> list[int]:
    """The labels a conditional generator's samples cycle through: `labels` (each checked against the
    generator's classes) or every class, 0 .. num_classes - 1, as the ONNX file records them."""
    from pipeline.io.export import NUM_CLASSES_KEY

    k = int(meta[NUM_CLASSES_KEY]) if NUM_CLASSES_KEY in meta else None
    card = where.parent / "model_card.json"  # an export written before the ONNX file carried its classes
    if k is None and card.is_file():
        k = (json.loads(card.read_text()).get("architecture") or {}).get("num_classes")
    if labels is None:
        if k is None:
            raise ValueError(f"{where}: this conditional generator does not record its classes; give --labels")
        return list(range(k))
    bad = [v for v in labels if v < 0 or (k is not None and v >= k)]
    if bad or not labels:
        classes = f"0..{k - 1}" if k is not None else "non-negative"
        raise ValueError(f"--labels: this generator's classes are {classes}, got {bad or 'none'}")
    return labels
