"""Export a generator as TorchScript and ONNX and prove both match PyTorch.

The exported graphs take `z` (N, z_dim) float32 ~ N(0, I) (and, for conditional generators, `y`
(N,) int64 class labels in [0, num_classes)) and return samples in the data's own scale and shape:
points (N, D) for 2D data, images (N, C, H, W) in [-1, 1] for image data. CycleGAN's two generators
(`export_translators`) take images `x` and return `translated` images of the same shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PARITY_TOL = 1e-4
NUM_CLASSES_KEY = "num_classes"  # a conditional generator's ONNX metadata: y takes 0 .. num_classes - 1


def example_inputs(z_dim: int, num_classes: int | None, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named generator inputs: z, plus y for conditional generators."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"z": torch.randn(n, z_dim, generator=g)}
    if num_classes:
        inputs["y"] = torch.randint(num_classes, (n,), generator=g)
    return inputs


def image_inputs(shape: list[int] | tuple[int, ...], n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named translator inputs: images `x` (n, C, H, W) in [-1, 1] (CycleGAN generators)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, *shape, generator=g) * 2 - 1}


def export_torchscript(G: torch.nn.Module, z_dim: int, path: Path, num_classes: int | None = None) -> None:
    _torchscript(G, example_inputs(z_dim, num_classes), path)


def export_onnx(G: torch.nn.Module, z_dim: int, path: Path, num_classes: int | None = None) -> None:
    _onnx(G, example_inputs(z_dim, num_classes), path, "x")
    if num_classes:  # the file says which labels `y` takes (ganpipe sample cycles through them)
        import onnx

        m = onnx.load(str(path))
        onnx.helper.set_model_props(m, {NUM_CLASSES_KEY: str(num_classes)})
        onnx.save(m, str(path))


def _torchscript(G: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    G.eval()
    torch.jit.trace(G, tuple(inputs.values()), check_trace=False).save(str(path))


def _onnx(G: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path, output: str) -> None:
    G.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            G,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=[output],
            dynamic_axes={**{k: {0: "n"} for k in inputs}, output: {0: "n"}},
            opset_version=17,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, fine for these graphs
        )


def parity(
    G: torch.nn.Module, z_dim: int, files: dict[str, Path], n: int = 64, seed: int = 0, num_classes: int | None = None
) -> dict[str, float]:
    """Max |exported(z[, y]) - G(z[, y])| over n random inputs, per exported format."""
    return _parity(G, example_inputs(z_dim, num_classes, n, seed), files)


def _parity(G: torch.nn.Module, inputs: dict[str, torch.Tensor], files: dict[str, Path]) -> dict[str, float]:
    G.eval()
    with torch.no_grad():
        ref = G(*inputs.values()).numpy()
    out: dict[str, float] = {}
    if "torchscript" in files:
        ts = torch.jit.load(str(files["torchscript"]))
        with torch.no_grad():
            out["torchscript"] = float(np.abs(ts(*inputs.values()).numpy() - ref).max())
    if "onnx" in files:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        out["onnx"] = float(np.abs(got - ref).max())
    return out


EXPORTERS = {"torchscript": ("generator.pt", export_torchscript), "onnx": ("generator.onnx", export_onnx)}


def export_all(
    G: torch.nn.Module, z_dim: int, formats: list[str], out_dir: Path, num_classes: int | None = None
) -> tuple[dict[str, Path], dict[str, float]]:
    """Write each format, check parity; raises if any format differs by PARITY_TOL or more."""
    files: dict[str, Path] = {}
    for fmt in formats:
        name, fn = EXPORTERS[fmt]
        files[fmt] = out_dir / name
        fn(G, z_dim, files[fmt], num_classes)
    diffs = parity(G, z_dim, files, num_classes=num_classes)
    _check(diffs)
    return files, diffs


def _check(diffs: dict[str, float], what: str = "") -> None:
    bad = {k: v for k, v in diffs.items() if not v < PARITY_TOL}
    if bad:
        raise RuntimeError(f"export parity failed{what} (max abs diff must be < {PARITY_TOL}): {bad}")


TRANSLATORS = {"generator_xy": "xy", "generator_yx": "yx"}  # file stem -> CycleGenerators attribute


def export_translators(
    G: torch.nn.Module, shape: list[int], formats: list[str], out_dir: Path
) -> tuple[dict[str, Path], dict[str, float]]:
    """Both CycleGAN generators, `generator_xy` (G: X -> Y) and `generator_yx` (F: Y -> X), in each
    format (`<stem>.pt`, `<stem>.onnx`): input `x` (N, C, H, W) in [-1, 1], output `translated`
    of the same shape. Keys of both results are `<stem>.<format>`; raises on a parity failure."""
    suffix = {"torchscript": ".pt", "onnx": ".onnx"}
    files: dict[str, Path] = {}
    diffs: dict[str, float] = {}
    for stem, attr in TRANSLATORS.items():
        net, mine = getattr(G, attr), {}
        for fmt in formats:
            mine[fmt] = out_dir / f"{stem}{suffix[fmt]}"
            if fmt == "torchscript":
                _torchscript(net, image_inputs(shape), mine[fmt])
            else:
                _onnx(net, image_inputs(shape), mine[fmt], "translated")
        d = _parity(net, image_inputs(shape, 64, 1), mine)
        _check(d, f" for {stem}")
        files.update({f"{stem}.{k}": v for k, v in mine.items()})
        diffs.update({f"{stem}.{k}": v for k, v in d.items()})
    return files, diffs


@dataclass(frozen=True)
class Lineage:
    """Where an exported model came from, as its model card tells it."""

    manifest: dict[str, Any]  # the prepared data's manifest
    train: dict[str, Any]  # metrics/train.json
    record: dict[str, Any]  # the train stage's run record (models/run.json)
    eval: dict[str, Any]  # metrics/eval.json
    git: dict[str, Any]  # the commit the export ran on


def translator_card(spec: dict, cfg, lineage: Lineage, *, diffs: dict, model_uris: dict) -> dict:
    """The model card of a CycleGAN export: which file translates which way, and the lineage."""
    manifest = lineage.manifest
    x, y = manifest["dataset"], manifest["target"]["dataset"]
    io = {"shape": ["N", *spec["sample_shape"]], "dtype": "float32", "range": "[-1, 1]"}
    card = {
        "family": "cyclegan",
        "generators": {
            "generator_xy": {
                "direction": f"X ({x}) -> Y ({y})",
                "paper_name": "G",
                "input": "x",
                "output": "translated",
            },
            "generator_yx": {
                "direction": f"Y ({y}) -> X ({x})",
                "paper_name": "F",
                "input": "x",
                "output": "translated",
            },
        },
        "inputs": {"x": {**io, "meaning": "images of the source domain (N, C, H, W)"}},
        "outputs": {"translated": {**io, "meaning": "the same images translated to the other domain"}},
        "architecture": spec,
        "data": {
            "dataset": x,
            "target": y,
            "content_hash": manifest["content_hash"],
            "n_train": manifest["n_train"],
            "n_train_target": manifest["target"]["n_train"],
        },
        **_lineage(cfg, lineage, diffs),
    }
    card["mlflow"]["model_uris"] = model_uris
    return card


def model_card(spec: dict, cfg, lineage: Lineage, *, diffs: dict, model_uri: str | None) -> dict:
    """What a user of the exported files needs to know, and the lineage to reproduce them."""
    manifest = lineage.manifest
    image = manifest["kind"] == "images"
    card = {
        "inputs": {
            "z": {"shape": ["N", spec["z_dim"]], "dtype": "float32", "distribution": "standard normal N(0, I)"},
            **(
                {
                    "y": {
                        "shape": ["N"],
                        "dtype": "int64",
                        "meaning": f"class label in [0, {spec['num_classes']})",
                        **({"data_labels": manifest["label_ids"]} if manifest.get("label_ids") else {}),
                        **({"class_names": manifest["class_names"]} if manifest.get("class_names") else {}),
                    }
                }
                if spec.get("num_classes")
                else {}
            ),
        },
        "outputs": {
            "x": {
                "shape": ["N", *spec["sample_shape"]],
                "dtype": "float32",
                "meaning": "images (N, C, H, W) in [-1, 1]" if image else "points in the data's own scale",
                # for points: the training data's smallest and largest coordinate, what that scale is
                **({} if image or "range" not in manifest else {"data_range": manifest["range"]}),
            }
        },
        "architecture": spec,
        "parameters": {"generator": _count_parameters(spec)},
        "data": {
            "dataset": manifest["dataset"],
            "content_hash": manifest["content_hash"],
            "n_train": manifest["n_train"],
        },
        **_lineage(cfg, lineage, diffs),
    }
    card["mlflow"]["model_uri"] = model_uri
    return card


def _count_parameters(spec: dict) -> int:
    from pipeline.core.objectives import build_generator

    return sum(p.numel() for p in build_generator(spec).parameters())


def _lineage(cfg, lineage: Lineage, diffs: dict) -> dict:
    """The model card's params, metrics, parity check, git commit, MLflow run and how the model was
    trained (the train stage's run record: run identity, resumed or handed back, training time)."""
    record = lineage.record
    return {
        "params": cfg.public_dict(),
        "metrics": {"train": lineage.train, "eval": lineage.eval},
        "parity_max_abs_diff": diffs,
        "git": lineage.git,
        "run": {k: v for k, v in record.items() if not k.startswith("mlflow_")},
        "mlflow": {"run_id": record.get("mlflow_run_id"), "tracking_uri": record.get("mlflow_tracking_uri")},
    }
