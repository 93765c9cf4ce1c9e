"""pipeline.io.export: TorchScript and ONNX files match PyTorch and take any batch size."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.core.models import build_generator, generator_spec
from pipeline.io.export import PARITY_TOL, export_all, parity

CASES = {
    "mlp": (ModelConfig(arch="mlp", z_dim=2, hidden=16, layers=2), [2]),
    "dcgan": (ModelConfig(arch="dcgan", z_dim=8, hidden=8), [1, 16, 16]),
    "resnet": (ModelConfig(arch="resnet", z_dim=8, hidden=8, attention=8), [3, 16, 16]),
}


def _generator(kind):
    torch.manual_seed(0)
    m, shape = CASES[kind]
    G = build_generator(generator_spec(m, shape))
    if kind != "mlp":
        # non-trivial BatchNorm running statistics, so eval mode differs from train mode
        G.train()
        with torch.no_grad():
            for _ in range(3):
                G(torch.randn(16, m.z_dim) * 2 + 0.5)
    return G, m.z_dim, shape


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    G, z_dim, shape = _generator(request.param)
    out = tmp_path_factory.mktemp(request.param)
    files, diffs = export_all(G, z_dim, ["torchscript", "onnx"], out)
    return G, z_dim, shape, files, diffs, out


def test_files_written(exported):
    _, _, _, files, _, out = exported
    assert files == {"torchscript": out / "generator.pt", "onnx": out / "generator.onnx"}
    for p in files.values():
        assert p.is_file() and p.stat().st_size > 0


def test_parity_reported(exported):
    _, _, _, _, diffs, _ = exported
    assert set(diffs) == {"torchscript", "onnx"}
    assert all(0.0 <= d < PARITY_TOL for d in diffs.values())


def _reference(G, z):
    G.eval()
    with torch.no_grad():
        return G(torch.from_numpy(z)).numpy()


@pytest.mark.parametrize("n", [1, 7, 33])
def test_onnx_dynamic_batch(exported, n):
    import onnxruntime as ort

    G, z_dim, shape, files, _, _ = exported
    sess = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["z"]
    assert [o.name for o in sess.get_outputs()] == ["x"]
    z = np.random.default_rng(n).standard_normal((n, z_dim)).astype(np.float32)
    got = sess.run(None, {"z": z})[0]
    assert got.shape == (n, *shape)
    assert np.abs(got - _reference(G, z)).max() < PARITY_TOL


def test_torchscript_other_batch(exported):
    G, z_dim, shape, files, _, _ = exported
    ts = torch.jit.load(str(files["torchscript"]))
    z = np.random.default_rng(5).standard_normal((9, z_dim)).astype(np.float32)
    with torch.no_grad():
        got = ts(torch.from_numpy(z)).numpy()
    assert got.shape == (9, *shape)
    assert np.abs(got - _reference(G, z)).max() < PARITY_TOL


def test_parity_detects_a_different_model(exported):
    # the check is not vacuous: a generator with other weights does not match the files
    G, z_dim, _, files, _, _ = exported
    other = copy.deepcopy(G)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    diffs = parity(other, z_dim, files)
    assert all(d > PARITY_TOL for d in diffs.values())


def test_export_only_requested_format(tmp_path):
    G, z_dim, _ = _generator("mlp")
    files, diffs = export_all(G, z_dim, ["onnx"], tmp_path)
    assert set(files) == set(diffs) == {"onnx"}
    assert not (tmp_path / "generator.pt").exists()


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_image_generators_export_with_labels_at_any_batch(arch, tmp_path):
    """Conditional batch norm has no affine weight of its own, so the ONNX exporter must know its
    channels: the ResNet generator's first block sits right after the reshape of z (it failed there)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m = ModelConfig(arch=arch, z_dim=8, hidden=8, conditional=True)
    G = build_generator(generator_spec(m, [3, 32, 32], num_classes=5))
    files, diffs = export_all(G, 8, ["torchscript", "onnx"], tmp_path, num_classes=5)
    assert all(0.0 <= d < PARITY_TOL for d in diffs.values())
    sess = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["z", "y"]
    z = np.random.default_rng(1).standard_normal((11, 8)).astype(np.float32)
    y = np.arange(11, dtype=np.int64) % 5
    got = sess.run(None, {"z": z, "y": y})[0]
    with torch.no_grad():
        ref = G.eval()(torch.from_numpy(z), torch.from_numpy(y)).numpy()
    assert got.shape == (11, 3, 32, 32) and np.abs(got - ref).max() < PARITY_TOL


@pytest.mark.parametrize("num_classes", [3, 12])
def test_sampling_a_conditional_export_cycles_through_its_own_classes(num_classes, tmp_path):
    """The ONNX file records its classes: `ganpipe sample` draws each of them (not a fixed 0..9, which
    crashed a 3-class model and never drew classes 10 and 11 of a 12-class one), and refuses labels
    outside them in one line. An older export without that record falls back on its model card."""
    from pipeline.io.registry import sample

    torch.manual_seed(0)
    m = ModelConfig(arch="dcgan", z_dim=8, hidden=8, conditional=True)
    G = build_generator(generator_spec(m, [1, 8, 8], num_classes=num_classes)).eval()
    files, _ = export_all(G, 8, ["onnx"], tmp_path, num_classes=num_classes)
    n = 2 * num_classes
    got = sample(files["onnx"], n, seed=3)
    z = torch.from_numpy(np.random.default_rng(3).standard_normal((n, 8)).astype(np.float32))
    with torch.no_grad():
        ref = G(z, torch.arange(n) % num_classes).numpy()
    assert np.abs(got - ref).max() < PARITY_TOL
    with torch.no_grad():
        two = G(z, torch.tensor([1, 2] * num_classes)).numpy()
    assert np.abs(sample(files["onnx"], n, seed=3, labels=[1, 2]) - two).max() < PARITY_TOL
    for bad in ([num_classes], [-1]):
        with pytest.raises(ValueError, match=rf"--labels: this generator's classes are 0\.\.{num_classes - 1}"):
            sample(files["onnx"], 4, seed=0, labels=bad)

    import onnx

    old = onnx.load(str(files["onnx"]))
    del old.metadata_props[:]
    onnx.save(old, str(files["onnx"]))
    with pytest.raises(ValueError, match="does not record its classes; give --labels"):
        sample(files["onnx"], 4, seed=0)
    (tmp_path / "model_card.json").write_text('{"architecture": {"num_classes": %d}}' % num_classes)
    assert np.abs(sample(files["onnx"], n, seed=3) - ref).max() < PARITY_TOL


def test_ganpipe_sample_refuses_bad_arguments_in_one_line_and_hides_credentials(tmp_path, capsys, monkeypatch):
    """Each bad argument is named (it used to be numpy's or matplotlib's words, a traceback for a
    corrupt file, an empty plot for --n 0, /tmp/s.png written for --out /tmp/s); a tracking URI's
    password never reaches the terminal."""
    from pipeline import cli

    G, z_dim, _ = _generator("mlp")
    export_all(G, z_dim, ["onnx"], tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generator.onnx").write_text("hello")
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  uri: http://user:s3cret@127.0.0.1:9\n")
    cases = [
        (["--n", "0"], "--n: the number of samples must be at least 1, got 0"),
        (["--seed", "-1"], "--seed: must be a non-negative integer"),
        (["--out", str(tmp_path / "s")], "--out: must end in .npy"),
        (["--labels", "a,b"], "--labels: comma-separated class numbers"),
        (["--labels", "1"], "--labels: this generator is unconditional"),
        (["--model", str(tmp_path / "bad")], "generator.onnx: not a readable ONNX model"),
        (["--model", "models:/g@champion", "--params", str(params)], "cannot reach the MLflow server at http://***@"),
    ]
    # tracking.uri from the params file (MLFLOW_TRACKING_URI, which wins, may be set by an earlier test)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args, message in cases:
        argv = ["sample", "--model", str(tmp_path), "--out", str(tmp_path / "s.npy"), *args]
        assert cli.main(argv) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert "s3cret" not in err
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.png").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:s3cret@127.0.0.1:9")  # the environment's, too
    assert cli.main(["sample", "--model", "models:/g@champion", "--out", str(tmp_path / "s.npy")]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the MLflow server at http://***@127.0.0.1:9" in err and "s3cret" not in err, err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert cli.main(["sample", "--model", str(tmp_path), "--n", "5", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (5, 2)
