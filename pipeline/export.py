"""Export a generator as TorchScript and ONNX and prove both match PyTorch.

The exported graphs take `z` (N, z_dim) float32 ~ N(0, I) (and, for conditional generators, `y`
(N,) int64 class labels in [0, num_classes)) and return samples in the data's own scale and shape:
points (N, D) for 2D data, images (N, C, H, W) in [-1, 1] for image data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

PARITY_TOL = 1e-4


def example_inputs(z_dim: int, num_classes: int | None, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named generator inputs: z, plus y for conditional generators."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"z": torch.randn(n, z_dim, generator=g)}
    if num_classes:
        inputs["y"] = torch.randint(num_classes, (n,), generator=g)
    return inputs


def export_torchscript(G: torch.nn.Module, z_dim: int, path: Path, num_classes: int | None = None) -> None:
    G.eval()
    scripted = torch.jit.trace(G, tuple(example_inputs(z_dim, num_classes).values()), check_trace=False)
    scripted.save(str(path))


def export_onnx(G: torch.nn.Module, z_dim: int, path: Path, num_classes: int | None = None) -> None:
    G.eval()
    inputs = example_inputs(z_dim, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            G,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=["x"],
            dynamic_axes={**{k: {0: "n"} for k in inputs}, "x": {0: "n"}},
            opset_version=17,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, fine for these graphs
        )


def parity(
    G: torch.nn.Module, z_dim: int, files: dict[str, Path], n: int = 64, seed: int = 0, num_classes: int | None = None
) -> dict[str, float]:
    """Max |exported(z[, y]) - G(z[, y])| over n random inputs, per exported format."""
    inputs = example_inputs(z_dim, num_classes, n, seed)
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
    bad = {k: v for k, v in diffs.items() if not v < PARITY_TOL}
    if bad:
        raise RuntimeError(f"export parity failed (max abs diff must be < {PARITY_TOL}): {bad}")
    return files, diffs


def model_card(spec, manifest, cfg, train_info, eval_info, diffs, git, model_uri) -> dict:
    """What a user of the exported files needs to know, and the lineage to reproduce them."""
    image = manifest["kind"] == "images"
    return {
        "inputs": {
            "z": {"shape": ["N", spec["z_dim"]], "dtype": "float32", "distribution": "standard normal N(0, I)"},
            **(
                {"y": {"shape": ["N"], "dtype": "int64", "meaning": f"class label in [0, {spec['num_classes']})"}}
                if spec.get("num_classes")
                else {}
            ),
        },
        "outputs": {
            "x": {
                "shape": ["N", *spec["sample_shape"]],
                "dtype": "float32",
                "meaning": "images (N, C, H, W) in [-1, 1]" if image else "points in the data's own scale",
            }
        },
        "architecture": spec,
        "data": {
            "dataset": manifest["dataset"],
            "content_hash": manifest["content_hash"],
            "n_train": manifest["n_train"],
        },
        "params": cfg.to_dict(),
        "metrics": {"train": train_info, "eval": eval_info},
        "parity_max_abs_diff": diffs,
        "git": git,
        "mlflow": {
            "run_id": train_info.get("mlflow_run_id"),
            "tracking_uri": train_info.get("mlflow_tracking_uri"),
            "model_uri": model_uri,
        },
    }
