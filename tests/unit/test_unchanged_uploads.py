"""pipeline.io.unchanged_uploads: a write of the bytes already written to a path is not sent again."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.io import unchanged_uploads
from pipeline.io.unchanged_uploads import skipping_unchanged


def sweep_folder(root: Path, trials: int) -> Path:
    """A Tune-like experiment folder: a state file and a few small files per trial."""
    src = root / "src"
    for i in range(trials):
        (src / f"trial_{i}").mkdir(parents=True)
        (src / f"trial_{i}" / "params.json").write_text(f'{{"lr": {i}}}')
        (src / f"trial_{i}" / "result.json").write_text(f'{{"step": 0, "trial": {i}}}\n')
    (src / "experiment_state.json").write_text("{}")
    return src


def sync(src: Path, fs: pafs.FileSystem, dest: Path) -> None:
    """What Ray does for a snapshot: make the folder, copy the tree (threaded, as Ray does for any
    filesystem that is not pyarrow's S3)."""
    fs.create_dir(str(dest), recursive=True)
    pafs.copy_files(str(src), str(dest), destination_filesystem=fs, use_threads=True)


def tamper(dest: Path) -> None:
    """Change every copy behind the filesystem's back: whatever a sync rewrites shows."""
    for f in dest.rglob("*.json"):
        f.write_text("tampered")


def test_a_second_snapshot_sends_only_what_changed(tmp_path: Path):
    src, dest = sweep_folder(tmp_path, 5), tmp_path / "store" / "sweep"
    fs = skipping_unchanged(pafs.LocalFileSystem())
    sync(src, fs, dest)
    assert {p.relative_to(dest) for p in dest.rglob("*.json")} == {p.relative_to(src) for p in src.rglob("*.json")}
    assert (dest / "trial_3" / "result.json").read_text() == (src / "trial_3" / "result.json").read_text()

    tamper(dest)
    (src / "trial_3" / "result.json").write_text('{"step": 0}\n{"step": 100}\n')  # the one running trial
    (src / "experiment_state.json").write_text('{"v": 2}')
    sync(src, fs, dest)
    sent = {str(p.relative_to(dest)) for p in dest.rglob("*.json") if p.read_text() != "tampered"}
    assert sent == {"trial_3/result.json", "experiment_state.json"}
    assert (dest / "trial_3" / "result.json").read_text() == '{"step": 0}\n{"step": 100}\n'


def test_deleting_moving_or_a_new_process_forgets_what_was_sent(tmp_path: Path):
    src, dest = sweep_folder(tmp_path, 2), tmp_path / "sweep"
    fs = skipping_unchanged(pafs.LocalFileSystem())
    sync(src, fs, dest)
    fs.delete_dir(str(dest / "trial_0"))  # Tune prunes a folder: the next snapshot puts it back
    sync(src, fs, dest)
    assert (dest / "trial_0" / "params.json").read_text() == '{"lr": 0}'

    fs.move(str(dest / "trial_1"), str(tmp_path / "elsewhere"))
    sync(src, fs, dest)
    assert (dest / "trial_1" / "result.json").is_file()

    tamper(dest)
    fresh = pickle.loads(pickle.dumps(fs))  # what a trial process or a resumed driver gets
    sync(src, fresh, dest)
    assert not [p for p in dest.rglob("*.json") if p.read_text() == "tampered"]


def test_large_files_go_through_a_temporary_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(unchanged_uploads, "SPOOL_BYTES", 1000)
    monkeypatch.setattr(unchanged_uploads, "_CHUNK", 777)
    payload = bytes(range(256)) * 40  # 10,240 bytes: spooled to disk, sent in several chunks
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(payload)
    fs = skipping_unchanged(pafs.LocalFileSystem())
    sync(tmp_path / "ckpt", fs, tmp_path / "store")
    assert (tmp_path / "store" / "model.pt").read_bytes() == payload
    with fs.open_input_stream(str(tmp_path / "store" / "model.pt")) as f:
        assert f.read() == payload


def test_a_failed_upload_is_not_remembered(tmp_path: Path):
    fs = skipping_unchanged(pafs.LocalFileSystem())
    target = tmp_path / "missing-parent" / "x.json"
    with pytest.raises(OSError):
        with fs.open_output_stream(str(target)) as out:
            out.write(b"{}")
    handler = fs.handler
    assert handler.sent(str(target)) is None
    target.parent.mkdir()
    with fs.open_output_stream(str(target)) as out:
        out.write(b"{}")
    assert target.read_bytes() == b"{}" and handler.sent(str(target)) is not None
