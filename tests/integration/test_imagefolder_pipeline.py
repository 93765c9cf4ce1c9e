"""The user's own images through the real pipeline: `dvc repro` on a folder of PNGs under
data/inputs/ (labels from sub-folders, a corrupt file skipped), and `prepare` from a moto S3 prefix
holding the same files, which must give the same data, byte for byte."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.datasets import shapes
from pipeline.io.teamstack import LOCAL_AWS as AWS
from pipeline.io.teamstack import s3_client
from tests.integration.conftest import set_params, sh
from tests.integration.test_s3_storage import s3_endpoint  # noqa: F401 (the moto fixture)

pytestmark = pytest.mark.integration

PARAMS = {
    "data": {
        "name": "imagefolder",
        "path": "data/inputs/shapes",
        "resolution": 16,
        "labels": "folders",
        "val_fraction": 0.2,
    },
    "model": {"arch": "dcgan", "z_dim": 16, "hidden": 8},
    "train": {"steps": 40, "batch_size": 32, "checkpoint_every": 20, "log_every": 20, "augment": "diffaugment"},
    "eval": {"every": 20, "n_samples": 200, "live_samples": 100},
}


def write_folder(root: Path, n: int = 240) -> list[Path]:
    """n shapes as PNG files, one sub-folder per class, plus one corrupt file."""
    x, y = shapes.draw(n, 20, seed=5)
    files = []
    for i, (img, k) in enumerate(zip(x, y)):
        path = root / shapes.class_name(k).replace(" ", "_") / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(path)
        files.append(path)
    broken = root / "red_circle" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return files + [broken]


def test_dvc_repro_on_an_image_folder(project: Path):
    write_folder(project / "data/inputs/shapes")
    set_params(project, PARAMS)
    p = sh(project, "dvc", "repro", timeout=900)
    assert "skipped 1 of 241 files that cannot be decoded: red_circle/broken.png" in p.stdout + p.stderr
    prepared = project / "data/prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["store"] == "npy-uint8" and manifest["skipped"] == ["red_circle/broken.png"]
    assert manifest["n_train"] + manifest["n_val"] == 240 and manifest["classes"] == 12
    assert manifest["class_names"] == sorted(manifest["class_names"]) and "red_circle" in manifest["class_names"]
    assert np.load(prepared / "train.x.npy", mmap_mode="r").shape == (192, 3, 16, 16)
    assert not (prepared / "decoded.npy").exists()
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["extractor"] == "classifier" and 1 <= ev["class_modes"] <= 12  # scored in the folder's classes
    assert (project / "export/generator.onnx").is_file()
    # the folder is a DVC dependency of prepare: adding an image reruns it
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(project / "data/inputs/shapes/red_circle/new.png")
    status = sh(project, "dvc", "status", "prepare").stdout
    assert "data/inputs" in status


def test_prepare_from_an_s3_prefix_equals_the_same_folder_on_disk(project: Path, s3_endpoint: str):  # noqa: F811
    folder = project / "data/inputs/shapes"
    files = write_folder(folder, n=120)
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="images")
    for f in files:
        s3.upload_file(str(f), "images", f"sets/shapes/{f.relative_to(folder).as_posix()}")
    s3.put_object(Bucket="images", Key="sets/shapes/README.txt", Body=b"not an image")

    set_params(project, PARAMS)
    sh(project, sys.executable, "stages/prepare.py", "--out", "local")
    set_params(project, {"data": {"path": "s3://images/sets/shapes"}, "storage": {"s3_endpoint_url": s3_endpoint}})
    p = sh(project, sys.executable, "stages/prepare.py", "--out", "remote", extra_env=AWS)
    assert "decoded 121/121 images" in p.stderr
    local = json.loads((project / "local/manifest.json").read_text())
    remote = json.loads((project / "remote/manifest.json").read_text())
    assert remote["content_hash"] == local["content_hash"]
    assert remote["class_names"] == local["class_names"] and remote["skipped"] == ["red_circle/broken.png"]
    assert remote["source"] == "s3://images/sets/shapes"

    set_params(project, {"data": {"path": "s3://images/empty"}})
    p = sh(project, sys.executable, "stages/prepare.py", "--out", "empty", check=False, extra_env=AWS)
    assert p.returncode == 1 and "data.path: no PNG, JPEG or WebP images under s3://images/empty" in p.stderr
    assert not (project / "empty").exists()
