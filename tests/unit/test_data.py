"""pipeline.core.data: the mixtures, the packaged image sets, the split, the manifest and npz checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.config import DataConfig
from pipeline.core.data import (
    DataError,
    check_fits_model,
    load_npz,
    load_prepared,
    mixture,
    prepare,
    sample_mixture,
    save_prepared,
)

# ---- 2D mixtures -----------------------------------------------------------------------------


def test_ring_definition():
    m = mixture("ring")
    assert m.centers.shape == (8, 2)
    assert m.std == 0.01
    np.testing.assert_allclose(np.linalg.norm(m.centers, axis=1), 1.0, atol=1e-12)
    angles = np.sort(np.mod(np.arctan2(m.centers[:, 1], m.centers[:, 0]), 2 * np.pi))
    np.testing.assert_allclose(angles, 2 * np.pi * np.arange(8) / 8, atol=1e-12)


def test_grid_definition():
    m = mixture("grid")
    assert m.centers.shape == (25, 2)
    assert m.std == 0.05
    g = [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert {tuple(c) for c in m.centers.tolist()} == {(a, b) for a in g for b in g}


def test_unknown_mixture():
    with pytest.raises(KeyError):
        mixture("spiral")


@pytest.mark.parametrize("name", ["ring", "grid"])
def test_sample_mixture_matches_definition(name):
    m = mixture(name)
    x, k = sample_mixture(name, 20_000, np.random.default_rng(0))
    assert x.shape == (20_000, 2) and x.dtype == np.float32
    assert set(np.unique(k)) == set(range(len(m.centers)))
    resid = x - m.centers[k]
    np.testing.assert_allclose(resid.mean(0), 0.0, atol=5 * m.std / math.sqrt(len(x)))
    np.testing.assert_allclose(resid.std(0), m.std, rtol=0.03)
    # modes are drawn uniformly
    counts = np.bincount(k, minlength=len(m.centers)) / len(k)
    np.testing.assert_allclose(counts, 1 / len(m.centers), atol=0.02)


@pytest.mark.parametrize("name, n_modes", [("ring", 8), ("grid", 25)])
def test_prepare_points(name, n_modes):
    p = prepare(DataConfig(name=name, n_samples=1000, val_fraction=0.2), seed=1)
    assert p.x_train.shape == (800, 2) and p.x_val.shape == (200, 2)
    assert p.x_train.dtype == np.float32
    assert p.y_train is None and p.y_val is None
    assert not p.is_image
    mf = p.manifest
    assert (mf["dataset"], mf["kind"], mf["sample_shape"]) == (name, "points", [2])
    assert (mf["n_train"], mf["n_val"], mf["classes"], mf["seed"]) == (800, 200, None, 1)
    # every point lies near one of the mixture's centres
    c = mixture(name).centers
    d = np.sqrt(((p.x_train[:, None] - c[None]) ** 2).sum(-1)).min(1)
    assert d.max() < 8 * mixture(name).std
    assert len(np.unique(((p.x_train[:, None] - c[None]) ** 2).sum(-1).argmin(1))) == n_modes


@pytest.mark.parametrize("frac", [0.001, 0.1, 0.25])
def test_split_sizes_follow_val_fraction(frac):
    p = prepare(DataConfig(name="grid", n_samples=1001, val_fraction=frac), seed=0)
    n_val = int(round(1001 * frac))
    assert len(p.x_val) == n_val and len(p.x_train) == 1001 - n_val
    assert (p.manifest["n_train"], p.manifest["n_val"]) == (1001 - n_val, n_val)


def test_split_is_a_partition(tmp_path):
    # the loaded data split into train and val: no sample duplicated or lost, labels follow
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100) % 7
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    p = prepare(DataConfig(name="npz", path=str(path), val_fraction=0.3), seed=3)
    both_x = np.concatenate([p.x_train, p.x_val])
    both_y = np.concatenate([p.y_train, p.y_val])
    order = np.argsort(both_x[:, 0])
    assert np.array_equal(both_x[order], x) and np.array_equal(both_y[order], y)
    assert not np.array_equal(p.x_train, x[30:])  # shuffled, not a head/tail cut


# ---- packaged image sets ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return prepare(DataConfig(name="digits", val_fraction=0.1), seed=0)


@pytest.fixture(scope="module")
def mnist5k():
    return prepare(DataConfig(name="mnist5k", val_fraction=0.1), seed=0)


def _check_images(p, shape, total):
    assert p.is_image
    assert p.x_train.shape[1:] == shape and p.x_val.shape[1:] == shape
    assert len(p.x_train) + len(p.x_val) == total
    assert len(p.x_val) == int(round(total * 0.1))
    for a in (p.x_train, p.x_val):
        assert a.dtype == np.float32
        assert a.min() >= -1.0 and a.max() <= 1.0
    assert p.x_train.min() == -1.0 and p.x_train.max() == 1.0  # the full range is used
    assert p.y_train.dtype == np.int64 and p.y_train.shape == (len(p.x_train),)
    assert p.y_val.shape == (len(p.x_val),)
    assert set(np.unique(np.concatenate([p.y_train, p.y_val]))) == set(range(10))
    mf = p.manifest
    assert mf["kind"] == "images" and mf["sample_shape"] == list(shape) and mf["classes"] == 10
    assert mf["class_counts"] == np.bincount(p.y_train, minlength=10).tolist()
    assert sum(mf["class_counts"]) == mf["n_train"] == len(p.x_train)
    assert mf["range"] == [-1.0, 1.0]


def test_digits(digits):
    _check_images(digits, (1, 8, 8), 1797)


def test_mnist5k(mnist5k):
    _check_images(mnist5k, (1, 28, 28), 5000)


# ---- manifest hash and files -----------------------------------------------------------------


def test_content_hash_stable_and_seed_sensitive():
    cfg = DataConfig(name="grid", n_samples=500)
    a, b, c = prepare(cfg, 0), prepare(cfg, 0), prepare(cfg, 1)
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    assert a.manifest["content_hash"] != c.manifest["content_hash"]
    assert len(a.manifest["content_hash"]) == 64


def test_content_hash_seed_sensitive_for_fixed_data(digits):
    # digits never change: only the split depends on the seed, and the hash must see it
    other = prepare(DataConfig(name="digits", val_fraction=0.1), seed=1)
    again = prepare(DataConfig(name="digits", val_fraction=0.1), seed=0)
    assert digits.manifest["content_hash"] == again.manifest["content_hash"]
    assert digits.manifest["content_hash"] != other.manifest["content_hash"]


@pytest.mark.parametrize("name", ["grid", "digits"])
def test_save_load_round_trip(tmp_path, name):
    p = prepare(DataConfig(name=name, n_samples=300), seed=0)
    save_prepared(p, tmp_path / "prepared")
    q = load_prepared(tmp_path / "prepared")
    assert q.manifest == p.manifest
    for a, b in ((p.x_train, q.x_train), (p.x_val, q.x_val), (p.y_train, q.y_train), (p.y_val, q.y_val)):
        if a is None:
            assert b is None
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_load_prepared_refuses_changed_arrays(tmp_path):
    p = prepare(DataConfig(name="grid", n_samples=300), seed=0)
    save_prepared(p, tmp_path)
    x = p.x_train.copy()
    x[0, 0] += 1.0
    np.savez(tmp_path / "train.npz", x=x)
    with pytest.raises(DataError, match="content hash"):
        load_prepared(tmp_path)


def test_load_prepared_without_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        load_prepared(tmp_path)


@pytest.mark.parametrize("name", ["grid", "shapes"])
def test_corrupt_prepared_data_is_named_in_one_line(tmp_path, name):
    """A truncated or foreign file under data/prepared: the message names the file and what to do
    (it was zipfile's "File is not a zip file" or a KeyError, naming nothing)."""
    p = prepare(DataConfig(name=name, n_samples=240, resolution=8), seed=0)
    x_file = "train.x.npy" if name == "shapes" else "train.npz"
    cases = {
        x_file: lambda f: f.write_bytes(f.read_bytes()[:100]),  # truncated
        "manifest.json": lambda f: f.write_text("{bad"),
    }
    if name == "grid":
        cases["val.npz"] = lambda f: np.savez(f, z=np.zeros(3))  # no x in it
    for broken, spoil in cases.items():
        d = tmp_path / broken
        save_prepared(p, d)
        spoil(d / broken)
        with pytest.raises(DataError, match=rf"{d / broken}: .*rerun the prepare stage") as e:
            load_prepared(d)
        assert "\n" not in str(e.value)
    d = tmp_path / "no-hash"
    save_prepared(p, d)
    (d / "manifest.json").write_text('{"n_train": 1}')
    with pytest.raises(DataError, match="not a manifest the prepare stage wrote"):
        load_prepared(d)


# ---- npz loader ------------------------------------------------------------------------------


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_npz_points_ok(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 2)) * 100
    y = np.arange(10) % 3
    got_x, got_y = load_npz(_npz(tmp_path, x=x, y=y))
    assert got_x.dtype == np.float32 and np.allclose(got_x, x)  # points keep their scale
    assert got_y.dtype == np.int64 and np.array_equal(got_y, y)


def test_npz_through_prepare(tmp_path):
    path = _npz(tmp_path, x=np.zeros((20, 2), np.float32))
    p = prepare(DataConfig(name="npz", path=path, val_fraction=0.25), seed=0)
    assert p.x_train.shape == (15, 2) and p.manifest["dataset"] == "npz"


def test_npz_uint8_images_scaled(tmp_path):
    x = np.zeros((3, 8, 8), np.uint8)
    x[0] = 255
    x[1] = 128
    got, y = load_npz(_npz(tmp_path, x=x))
    assert y is None
    assert got.shape == (3, 1, 8, 8) and got.dtype == np.float32
    assert np.all(got[0] == 1.0) and np.all(got[2] == -1.0)
    np.testing.assert_allclose(got[1], 128 / 127.5 - 1.0, atol=1e-6)


def test_npz_float_images_in_range_kept(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 3, 16, 16)).astype(np.float32)
    got, _ = load_npz(_npz(tmp_path, x=x))
    assert np.array_equal(got, x)


def test_npz_missing_file(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(DataError) as e:
        load_npz(path)
    assert "data.path" in str(e.value) and path in str(e.value)


def test_npz_no_path():
    with pytest.raises(DataError, match="data.path"):
        load_npz(None)


def test_npz_not_an_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(DataError) as e:
        load_npz(str(path))
    assert str(path) in str(e.value) and "not a readable .npz" in str(e.value)


def test_npz_plain_npy_refused(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((3, 2)))
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(str(path))


def test_npz_without_x(tmp_path):
    path = _npz(tmp_path, data=np.zeros((3, 2)))
    with pytest.raises(DataError) as e:
        load_npz(path)
    assert path in str(e.value) and "'x'" in str(e.value) and "data" in str(e.value)


BAD_NPZ = [
    pytest.param({"x": np.zeros((0, 2), np.float32)}, "'x' is empty", id="empty-x"),
    pytest.param({"x": np.zeros((5,), np.float32)}, "'x' must be (N, D)", id="1d-x"),
    pytest.param({"x": np.zeros((2, 1, 1, 8, 8), np.float32)}, "'x' must be (N, D)", id="5d-x"),
    pytest.param({"x": np.array([[0.0, np.nan], [1.0, 2.0]])}, "NaN or inf", id="nan-points"),
    pytest.param({"x": np.array([[0.0, np.inf], [1.0, 2.0]])}, "NaN or inf", id="inf-points"),
    pytest.param({"x": np.where(np.eye(8) > 0, np.nan, 0.5)[None, None].repeat(2, 0)}, "NaN or inf", id="nan-images"),
    pytest.param({"x": np.full((2, 8, 8), 1.5, np.float32)}, "[-1, 1]", id="float-images-above"),
    pytest.param({"x": np.full((2, 8, 8), -3.0, np.float32)}, "[-1, 1]", id="float-images-below"),
    pytest.param({"x": np.zeros((2, 2, 8, 8), np.float32)}, "1 or 3 channels", id="two-channels"),
    pytest.param({"x": np.zeros((2, 1, 4, 4), np.float32)}, "sides 8..256", id="tiny-images"),
    pytest.param({"x": np.array([["a", "b"]])}, "numeric", id="strings"),
    pytest.param(
        {"x": np.zeros((4, 3), np.float32)}, "points must be 2-dimensional (N, 2), got (N, 3)", id="3d-points"
    ),
    pytest.param({"x": np.zeros((4, 2)), "y": np.zeros((3,), np.int64)}, "'y'", id="y-too-short"),
    pytest.param({"x": np.zeros((4, 2)), "y": np.zeros((4, 1), np.int64)}, "'y'", id="y-2d"),
    pytest.param({"x": np.zeros((4, 2)), "y": np.zeros((4,), np.float32)}, "'y'", id="y-float"),
    pytest.param({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 2])}, "'y'", id="y-negative"),
]


@pytest.mark.parametrize("arrays, gist", BAD_NPZ)
def test_npz_bad_content(tmp_path, arrays, gist):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as e:
        load_npz(path)
    msg = str(e.value)
    assert msg.startswith(path + ":"), msg
    assert gist in msg, msg


def test_npz_scalar_x_is_a_data_error(tmp_path):
    path = _npz(tmp_path, x=np.float32(3.0))
    with pytest.raises(DataError, match="'x'"):
        load_npz(path)


@pytest.mark.parametrize(
    "x", [np.full((2, 8, 8), 1000, np.int16), np.full((2, 8, 8), -5, np.int8)], ids=["int16-1000", "int8-neg"]
)
def test_npz_integer_images_outside_0_255(tmp_path, x):
    path = _npz(tmp_path, x=x)
    with pytest.raises(DataError, match="0..255"):
        load_npz(path)


def test_remote_npz_is_read_through_fetch(tmp_path):
    import io

    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    asked = []
    got, y = load_npz("s3://bucket/sets/a.npz", lambda uri: asked.append(uri) or buf.getvalue())
    assert asked == ["s3://bucket/sets/a.npz"] and np.array_equal(got, x) and y is None
    with pytest.raises(DataError, match="data.path: no S3 reader given for s3://bucket/sets/a.npz"):
        load_npz("s3://bucket/sets/a.npz")
    with pytest.raises(DataError, match="s3://bucket/bad.npz: not a readable .npz file"):
        load_npz("s3://bucket/bad.npz", lambda uri: b"not a zip")


def test_a_split_that_leaves_no_validation_sample_is_refused():
    with pytest.raises(DataError, match="data.val_fraction: 0.0 of 1001 samples leaves no validation sample"):
        prepare(DataConfig(name="grid", n_samples=1001, val_fraction=0.0), seed=0)


def test_sparse_label_ids_become_classes_0_to_k_minus_1_with_the_mapping_recorded(tmp_path):
    y = np.array([7, 1_000_000, 3, 7, 3, 1_000_000, 7, 3, 1_000_000, 7] * 4)
    path = _npz(tmp_path, x=np.zeros((len(y), 2), np.float32), y=y)
    p = prepare(DataConfig(name="npz", path=path, val_fraction=0.25), seed=0)
    assert p.manifest["classes"] == 3 and p.manifest["label_ids"] == [3, 7, 1_000_000]
    ids = np.array(p.manifest["label_ids"])
    assert set(p.y_train.tolist()) == {0, 1, 2} and sum(p.manifest["class_counts"]) == len(p.x_train)
    assert np.array_equal(np.sort(ids[np.concatenate([p.y_train, p.y_val])]), np.sort(y))  # the same labels
    dense = prepare(DataConfig(name="npz", path=_npz(tmp_path, x=np.zeros((8, 2)), y=np.arange(8) % 2)), seed=0)
    assert "label_ids" not in dense.manifest  # already 0..K-1: nothing to record


@pytest.mark.parametrize(
    "kind,shape,arch,gist",
    [
        ("images", [1, 8, 8], "mlp", "model.arch: the prepared data are images (1, 8, 8), which need dcgan, got mlp"),
        ("points", [2], "dcgan", "model.arch: the prepared data are 2D points, which need mlp, got dcgan"),
    ],
)
def test_the_data_kind_must_suit_the_architecture(kind, shape, arch, gist):
    with pytest.raises(DataError) as e:
        check_fits_model({"kind": kind, "sample_shape": shape}, arch)
    assert str(e.value) == gist
    check_fits_model({"kind": kind, "sample_shape": shape}, "mlp" if arch == "dcgan" else "dcgan")


# ---- shapes: the known-answer RGB set ----------------------------------------------------------


def test_shapes_are_deterministic_labelled_and_cover_every_class():
    from pipeline.core.datasets import shapes

    x, y = shapes.draw(600, 16, seed=3)
    x2, y2 = shapes.draw(600, 16, seed=3)
    assert x.shape == (600, 3, 16, 16) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert set(y.tolist()) == set(range(shapes.NUM_CLASSES))
    assert not np.array_equal(x, shapes.draw(600, 16, seed=4)[0])


def test_shapes_classes_are_what_they_claim():
    """Known answers: the pixels of the shape carry the class colour, and the shape's area
    relative to its circumradius r is pi r^2 (circle), 2 r^2 (square), (3 sqrt 3 / 4) r^2 (triangle)."""
    from pipeline.core.datasets import shapes

    side, n = 128, 120
    x, y = shapes.draw(n, side, seed=0)
    rng = np.random.default_rng(0)  # the same draws as shapes.draw: classes first, then the radius
    rng.integers(shapes.NUM_CLASSES, size=n)
    radius = rng.uniform(0.2, 0.34, n) * side
    colours = np.array(list(shapes.COLOURS.values()))
    for img, k, r in zip(x.astype(np.float64) / 255, y, radius):
        colour = colours[k % 4]
        inside = np.abs(img - colour[:, None, None]).max(0) < 0.15  # pixels of the shape's colour
        area = inside.sum() / r**2
        expected = (np.pi, 2.0, 3 * np.sqrt(3) / 4)[k // 4]
        assert abs(area - expected) / expected < 0.06, (shapes.class_name(k), area, expected)


@pytest.mark.parametrize("resolution, channels", [(8, 1), (32, 3), (64, 3)])
def test_shapes_prepare_at_a_resolution(resolution, channels):
    cfg = DataConfig(name="shapes", n_samples=240, resolution=resolution, channels=channels)
    p = prepare(cfg, seed=0)
    assert p.x_train.shape[1:] == (channels, resolution, resolution)
    assert p.x_train.dtype == np.uint8  # the store keeps uint8; to_unit maps rows to [-1, 1]
    assert p.manifest["classes"] == 12 and p.manifest["kind"] == "images"
    assert p.manifest["store"] == "npy-uint8"
    assert -1.0 <= p.manifest["range"][0] < p.manifest["range"][1] <= 1.0
    # what each class id means, for the model card of a conditional model: colour-major within a shape
    names = p.manifest["class_names"]
    assert (
        len(names) == 12 and names[0] == "red circle" and names[5] == "green square" and names[11] == "yellow triangle"
    )


def test_resolution_must_be_a_power_of_two():
    from pipeline.core.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="data.resolution: must be a power of two in 8..256, got 48"):
        build_config({"data": {"name": "shapes", "resolution": 48}, "model": {"arch": "dcgan"}})


def test_a_dataset_is_one_module_the_config_and_the_stages_then_know():
    """pipeline/core/datasets/moons.py registers itself: the config accepts it, asks for a points model,
    and the evaluation scores it with W1 only (it declares no known-answer metrics)."""
    from pipeline.core.config import ConfigError, build_config
    from pipeline.core.datasets import point_metric_names, point_scores

    cfg = build_config({"data": {"name": "moons", "n_samples": 400}})
    p = prepare(cfg.data, seed=0)
    assert p.x_train.shape == (360, 2) and p.y_train is None
    # two half circles of radius 1: centres (0, 0) and (1, 0.5), so every point is about 1 from one
    r1, r2 = np.hypot(*p.x_train.T), np.hypot(p.x_train[:, 0] - 1, p.x_train[:, 1] - 0.5)
    assert np.minimum(np.abs(r1 - 1), np.abs(r2 - 1)).mean() < 0.06
    with pytest.raises(ConfigError, match=r"model.arch: 2D data \(moons\) needs mlp, got dcgan"):
        build_config({"data": {"name": "moons"}, "model": {"arch": "dcgan"}})
    assert point_metric_names("moons") == ("w1",)
    assert set(point_scores("moons", p.x_val, p.x_val)) == {"w1"}


def test_a_memmap_that_lost_its_file_ships_as_an_array(tmp_path):
    """A memory-mapped array unpickled from Ray's object store is a memmap with no file: it crosses
    to the next worker as its values, not as a path to nowhere."""
    import pickle

    from pipeline.core import data as data_module

    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.uint8).reshape(3, 4))
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(data_module.shippable(mapped), data_module.StoreFile)
    orphan = pickle.loads(pickle.dumps(mapped))
    shipped = data_module.shippable(orphan)
    assert not isinstance(shipped, data_module.StoreFile) and np.array_equal(shipped, mapped)
