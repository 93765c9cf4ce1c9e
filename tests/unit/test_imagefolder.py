"""pipeline.core.datasets.imagefolder and the uint8 image store: decoding, resizing, labels from folders,
corrupt files, and a memory-mapped store that trains exactly like the same images in memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core import data
from pipeline.core.config import ConfigError, DataConfig, build_config
from pipeline.core.datasets import DataError, imagefolder, shapes


def _write_shapes(root: Path, n: int = 60, side: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n shapes images as PNG files in one folder per class (named after the class)."""
    x, y = shapes.draw(n, side, seed)
    for i, (img, k) in enumerate(zip(x, y)):
        folder = root / shapes.class_name(k).replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    return x, y


def test_decode_resizes_the_short_side_and_crops_the_centre():
    # 64 wide, 32 high: white in columns 16..47, black elsewhere; the centre square is all white
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    out = imagefolder.decode(buf.getvalue(), 16, 3)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert out[:, :, 2:-2].min() >= 250  # bicubic may soften only the outermost columns
    grey = imagefolder.decode(buf.getvalue(), 8, 1)
    assert grey.shape == (1, 8, 8)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_decode(tmp_path: Path, fmt: str):
    a = np.full((20, 20, 3), (200, 40, 40), np.uint8)
    path = tmp_path / f"red.{fmt.lower()}"
    Image.fromarray(a).save(path, format=fmt, quality=95)
    out = imagefolder.decode(str(path), 8, 3)
    assert abs(int(out[0].mean()) - 200) < 8 and abs(int(out[1].mean()) - 40) < 8


def test_a_folder_of_class_folders_gives_the_images_and_their_labels(tmp_path: Path):
    x, y = _write_shapes(tmp_path, n=60, side=24)
    cfg = DataConfig(name="imagefolder", path=str(tmp_path), resolution=16, labels="folders", val_fraction=0.2)
    raw_x, raw_y, info = imagefolder.load(cfg, 0)
    names = imagefolder.list_images(str(tmp_path))
    assert len(names) == 60 and info["files"] == 60
    # every label is the class of its folder
    classes = info["class_names"]
    for name, k in zip(names, raw_y):
        assert Path(name).parent.name == classes[k]
    assert raw_x.shape == (60, 3, 16, 16) and raw_x.dtype == np.uint8
    p = data.prepare(cfg, 0)
    assert p.manifest["class_names"] == classes and p.manifest["classes"] == len(classes)
    assert p.manifest["n_train"] == 48 and p.manifest["n_val"] == 12


def test_unlabelled_by_default_and_folders_need_sub_folders(tmp_path: Path):
    _write_shapes(tmp_path, n=12)
    p = data.prepare(DataConfig(name="imagefolder", path=str(tmp_path), resolution=8, val_fraction=0.25), 0)
    assert p.y_train is None and p.manifest["classes"] is None
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="loose.png lies directly in"):
        data.prepare(DataConfig(name="imagefolder", path=str(tmp_path), labels="folders", resolution=8), 0)


def test_a_few_corrupt_files_are_skipped_and_listed(tmp_path: Path, capsys):
    _write_shapes(tmp_path, n=200, side=16)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    p = data.prepare(DataConfig(name="imagefolder", path=str(tmp_path), resolution=16, val_fraction=0.1), 0)
    assert p.manifest["skipped"] == ["broken.png"]
    assert p.manifest["n_train"] + p.manifest["n_val"] == 200
    assert "skipped 1 of 201 files" in capsys.readouterr().err


def test_more_than_one_percent_corrupt_fails_naming_them(tmp_path: Path):
    _write_shapes(tmp_path, n=20, side=16)
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"data.path: 3 of 23 images cannot be decoded .*bad0.jpg"):
        data.prepare(DataConfig(name="imagefolder", path=str(tmp_path), resolution=16), 0)


def test_an_empty_folder_or_a_missing_one_fails_at_once(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="data.path: no PNG, JPEG or WebP images under"):
        data.prepare(DataConfig(name="imagefolder", path=str(tmp_path)), 0)
    with pytest.raises(DataError, match="data.path: not a folder"):
        data.prepare(DataConfig(name="imagefolder", path=str(tmp_path / "nope")), 0)


def test_config_checks():
    with pytest.raises(ConfigError, match="data.path: required when data.name is imagefolder"):
        build_config({"data": {"name": "imagefolder"}, "model": {"arch": "dcgan"}})
    with pytest.raises(ConfigError, match="data.labels: folders labels an imagefolder"):
        build_config({"data": {"name": "shapes", "labels": "folders"}, "model": {"arch": "dcgan"}})


def test_parallel_decoding_equals_one_process(tmp_path: Path):
    _write_shapes(tmp_path, n=600, side=16)
    names = imagefolder.list_images(str(tmp_path))
    one, _ = imagefolder.decode_all(names, 16, 3, workers=1)
    two, _ = imagefolder.decode_all(names, 16, 3, workers=2)
    np.testing.assert_array_equal(one, two)


# ---- the store ------------------------------------------------------------------------------


def test_the_store_on_disk_equals_the_arrays_in_memory(tmp_path: Path):
    cfg = DataConfig(name="shapes", n_samples=500, resolution=16)
    in_memory = data.prepare(cfg, 0)
    out = tmp_path / "prepared"
    out.mkdir()
    on_disk = data.prepare(cfg, 0, scratch=out)
    assert isinstance(on_disk.x_train, np.memmap)
    data.save_prepared(on_disk, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "train.x.npy",
        "train.y.npy",
        "val.x.npy",
        "val.y.npy",
    ]  # the loader's decoded.npy is gone
    assert on_disk.manifest["content_hash"] == in_memory.manifest["content_hash"]
    loaded = data.load_prepared(out)
    assert isinstance(loaded.x_train, np.memmap)
    np.testing.assert_array_equal(loaded.x_train, in_memory.x_train)
    np.testing.assert_array_equal(loaded.y_val, in_memory.y_val)
    # a flipped byte in the store is caught by the content hash
    raw = np.load(out / "val.x.npy", mmap_mode="r+")
    raw[0, 0, 0, 0] ^= 1
    raw.flush()
    del raw
    with pytest.raises(DataError, match="do not match the manifest's content hash"):
        data.load_prepared(out)


def test_training_from_the_uint8_store_equals_training_from_floats(tmp_path: Path):
    from pipeline.core import training

    raw = {
        "data": {"name": "shapes", "n_samples": 200, "resolution": 16},
        "model": {"arch": "dcgan", "z_dim": 8, "hidden": 8},
        "train": {"steps": 4, "batch_size": 16, "log_every": 2, "ema": 0.0},
        "eval": {"every": 0},
    }
    cfg = build_config(raw)
    out = tmp_path / "p"
    out.mkdir()
    p = data.prepare(cfg.data, 0, scratch=out)
    data.save_prepared(p, out)
    store = data.load_prepared(out).x_train
    assert store.dtype == np.uint8

    def weights(x: torch.Tensor) -> list[torch.Tensor]:
        gan = training.build_gan(cfg, list(x.shape[1:]))
        training.train(gan, cfg, training.Batches(x, 16, 8, cfg.seed), training.Hooks())
        return [t.detach().clone() for t in gan.G.state_dict().values()]

    from_store = weights(torch.from_numpy(data.unship(data.shippable(store))))
    from_floats = weights(torch.from_numpy(data.to_unit(np.asarray(store))))
    for a, b in zip(from_store, from_floats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_store_file_elsewhere_is_named(tmp_path: Path):
    with pytest.raises(DataError, match="the prepared image store is not on this node"):
        data.StoreFile(str(tmp_path / "train.x.npy")).open()
