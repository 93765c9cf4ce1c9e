"""pipeline.io.outputs: a stage's output folder is replaced whole or not at all, and only a stage's output."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_an_output_folder_is_complete_or_absent_and_a_crash_leaves_nothing_git_sees(tmp_path: Path):
    import subprocess

    from pipeline.io import outputs

    target = tmp_path / "export"
    stale = tmp_path / f"{outputs.TMP_PREFIX}export.abc123"  # what a killed stage left behind
    stale.mkdir()
    try:
        with outputs.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise OSError("disk full")
    except OSError:
        pass
    assert not target.exists() and not stale.exists() and list(tmp_path.iterdir()) == []
    with outputs.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("whole")
    assert (target / "a.txt").read_text() == "whole"
    # the repository's .gitignore covers a temporary left by a crash
    root = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"models/{outputs.TMP_PREFIX}models.x1y2"], cwd=root, capture_output=True
    )
    assert ignored.returncode == 0


def test_an_output_folder_that_is_not_a_stage_output_is_never_replaced(tmp_path: Path, monkeypatch):
    """`ganpipe prepare --out data` deleted data/inputs (the user's own data): a folder holding a
    folder, a file, or the working folder (or one above it) is refused before the block runs."""
    from pipeline.io import outputs

    data = tmp_path / "data"
    (data / "inputs").mkdir(parents=True)
    (data / "inputs" / "mine.npz").write_bytes(b"the user's")
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "elsewhere").mkdir()
    ran = []
    for cwd, bad, why in [
        ("elsewhere", data, "holds the folder inputs/"),
        ("elsewhere", tmp_path / "notes.txt", "exists and is not a folder"),
        ("data/inputs", data / "inputs", "is the working folder"),
        ("data/inputs", data, "is the working folder or holds it"),
    ]:
        monkeypatch.chdir(tmp_path / cwd)
        with pytest.raises(ValueError, match=why):
            with outputs.atomic_dir(bad) as tmp:
                ran.append(tmp)
    assert ran == [] and (data / "inputs" / "mine.npz").read_bytes() == b"the user's"
    assert (tmp_path / "notes.txt").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "elsewhere", "notes.txt"]  # no temporary left
    out = data / "prepared"  # a stage's own output (files only) is replaced as before
    for text in ("old", "new"):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "manifest.json").write_text(text)
    assert (out / "manifest.json").read_text() == "new"
