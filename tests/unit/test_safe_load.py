"""Checkpoints are read as tensors and plain data only: a crafted file under storage.root cannot run
code, and every state the pipeline writes still loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core import training
from pipeline.core.config import build_config
from pipeline.io.outputs import UnsafeFile, load_tensors

CONFIGS = {
    "mlp-ema-ada-pack": {
        "data": {"name": "grid"},
        "model": {"hidden": 16, "pack": 2},
        "train": {"ema": 0.9, "batch_size": 16, "ada": {"enabled": True}},
    },
    "dcgan-conditional-r1": {
        "data": {"name": "digits"},
        "model": {"arch": "dcgan", "z_dim": 8, "hidden": 8, "conditional": True},
        "loss": {"r1_gamma": 1.0},
        "train": {"batch_size": 16},
    },
    "cyclegan-pools": {
        "data": {"name": "digits", "target": "mnist5k"},
        "model": {"family": "cyclegan", "arch": "dcgan", "hidden": 8},
        "train": {"batch_size": 4, "pool_size": 4},
    },
}


def trained_state(raw: dict) -> dict:
    cfg = build_config({**raw, "train": {**raw["train"], "steps": 2, "log_every": 1, "checkpoint_every": 1}})
    image = cfg.model.arch == "dcgan"
    shape = [1, 28, 28] if cfg.model.family == "cyclegan" else ([1, 8, 8] if image else [2])
    classes = 10 if cfg.model.conditional else None
    gan = training.build_gan(cfg, shape, num_classes=classes)
    g = torch.Generator().manual_seed(0)
    x = torch.rand([64, *shape], generator=g) * 2 - 1
    y = torch.arange(64) % 10 if classes else None
    x_b = x.clone() if cfg.model.family == "cyclegan" else None
    batches = training.Batches(x, cfg.train.batch_size, cfg.model.z_dim, 0, y=y, num_classes=classes or 0, x_b=x_b)
    training.train(gan, cfg, batches)
    extra = {"fit_id": "abc", "restarts": 0, "pools_by_rank": None, "handed_back": False, "trained_s": 1.5}
    return {**training.gan_state(gan), **extra, "finished_at": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_state_the_pipeline_writes_loads_safely(tmp_path: Path, name: str):
    state = trained_state(CONFIGS[name])
    torch.save(state, tmp_path / "state.pt")
    back = load_tensors(tmp_path / "state.pt")
    assert back["step"] == 2 and back["history"] == state["history"] and back["spec"] == state["spec"]
    assert all(torch.equal(back["G"][k], state["G"][k]) for k in state["G"])
    assert back["opt_d"]["param_groups"] == state["opt_d"]["param_groups"]


class Payload:
    def __reduce__(self):  # what a crafted checkpoint does: call anything at load time
        return (Path.touch, (Path(MARK),))


MARK = ""


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    global MARK
    MARK = str(tmp_path / "pwned")
    path = tmp_path / "state.pt"
    torch.save({"step": 1, "G": Payload()}, path)
    with pytest.raises(UnsafeFile, match=f"{path}: refused to load"):
        load_tensors(path)
    assert not Path(MARK).exists()


def test_a_truncated_or_foreign_file_is_named_in_one_line(tmp_path: Path):
    """torch's own words for these ("PytorchStreamReader failed...", KeyError: 101, KeyError: 'spec')
    named no file; a Ray checkpoint's is named where it lives."""
    from ray.train import Checkpoint

    from pipeline.io.outputs import load_generator, read_json
    from pipeline.ray.runtime import STATE_FILE, load_state

    good = tmp_path / "good.pt"
    torch.save({"step": 3, "w": torch.ones(1000)}, good)
    cut, text = tmp_path / "cut.pt", tmp_path / "text.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    text.write_text("hello")
    for path in (cut, text):
        with pytest.raises(ValueError, match=f"{path}: cannot be read .*: it is truncated or not a file") as e:
            load_tensors(path)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=f"{good}: not a generator saved by the train stage"):
        load_generator(good)
    ckpt = tmp_path / "checkpoint_000002"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"^{ckpt / STATE_FILE}: cannot be read"):
        load_state(Checkpoint.from_directory(str(ckpt)))
    listed = tmp_path / "train.json"
    for content, message in (("[]", "holds a JSON list, not an object"), ("{bad", "not readable JSON")):
        listed.write_text(content)
        with pytest.raises(ValueError, match=f"{listed}: {message}"):
            read_json(listed, "run the train stage first")
