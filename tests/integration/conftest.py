"""A throwaway copy of the project in a temporary git + DVC repo, with tiny params."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "data": {"n_samples": 2000},
    "model": {"hidden": 32},
    "train": {"steps": 300, "checkpoint_every": 100, "log_every": 50, "batch_size": 64},
    "eval": {"n_samples": 500},
    "ray": {"num_cpus": 2},
}


def merge(base: dict, update: dict) -> dict:
    from pipeline.core.config import deep_merge  # the pipeline's own rule (a search space is replaced whole)

    return deep_merge(base, update)


def env(extra: dict[str, str] | None = None, project: Path | None = None) -> dict[str, str]:
    """A clean environment for a child; with `project`, the child imports that copy's own `pipeline`
    and `stages` (a stage script's folder is first on sys.path, so without it Python would take them
    from whichever checkout the environment's editable install names)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    if project is not None:
        e["PYTHONPATH"] = str(project)
    e.update(extra or {})
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "test"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "test@example.com"
    return e


def sh(
    cwd: Path, *cmd: str, check: bool = True, timeout: int = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env(extra_env, cwd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def spawn(project: Path, *cmd: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a command in `project` in a process group of its own (stop it with `stop_group`), its
    stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        list(cmd),
        cwd=project,
        env=env(extra_env, project=project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def set_params(project: Path, update: dict) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), update), sort_keys=False))


_TEMPLATE: list[Path] = []


def _template() -> Path:
    """This checkout's code, params.yaml and dvc.yaml in a fresh git + DVC repository, nothing committed:
    made once per test process (`dvc init` alone takes seconds) and copied by `make_project`."""
    if not _TEMPLATE:
        base = Path(tempfile.mkdtemp(prefix="ganpipe-template-"))
        atexit.register(shutil.rmtree, base, True)
        t = base / "proj"
        t.mkdir()
        for name in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
            shutil.copy(ROOT / name, t / name)
        for d in ("pipeline", "stages", "presets", "data/inputs"):
            shutil.copytree(ROOT / d, t / d, ignore=shutil.ignore_patterns("__pycache__"))
        sh(t, "git", "init", "-q")
        sh(t, "dvc", "init", "-q")
        _TEMPLATE.append(t)
    return _TEMPLATE[0]


def make_project(proj: Path, params: dict | None = None) -> Path:
    """A git + DVC repository at `proj` holding this checkout's code, params.yaml (with `params`
    merged in) and dvc.yaml, committed; no stores, no outputs."""
    shutil.copytree(_template(), proj, symlinks=True)
    if params:
        set_params(proj, params)
    sh(proj, "git", "add", "-A")
    sh(proj, "git", "commit", "-qm", "init")
    return proj


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", TINY)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_group(p: subprocess.Popen) -> None:
    """Stop a process started with start_new_session, and everything it started."""
    import signal

    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
