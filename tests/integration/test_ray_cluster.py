"""The train stage joins an existing Ray cluster (`ray start --head` in its own process) via RAY_ADDRESS."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, env, free_port, sh, stop_group, wait_for_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("auth", ["none", "token"])
def test_train_stage_runs_on_the_given_cluster(project: Path, auth: str):
    """Also a cluster with Ray's token authentication, joined with the token (docs/team.md)."""
    port = free_port()
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex} if auth == "token" else {}
    # Ray's unix sockets live under --temp-dir: keep it short (socket paths are limited to 107 bytes)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
        ],
        env=env({"RAY_USAGE_STATS_ENABLED": "0", **auth_env}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        sh(project, sys.executable, "stages/prepare.py")
        p = sh(project, sys.executable, "stages/train.py", extra_env={"RAY_ADDRESS": f"127.0.0.1:{port}", **auth_env})
        assert f"joined Ray cluster at 127.0.0.1:{port}" in p.stdout, p.stdout
        assert re.search(rf"cluster [\d.]+:{port}", p.stdout), p.stdout  # printed by the worker itself
        assert (project / "models/generator.pt").is_file()
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
