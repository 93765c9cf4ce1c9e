"""A sweep on a two-node Ray cluster started the way a team starts one (`ray start --head`, then
`ray start --address=...`: two raylets with their own CPUs), with its storage root on S3 (moto's
server): trials land on both nodes, their checkpoints go to the bucket, not to a local path, and
when the worker node dies mid-sweep its trials start again on the head from the bucket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.io.teamstack import LOCAL_AWS as AWS
from tests.integration.conftest import BIN, env, free_port, set_params, sh, spawn, stop_group, wait_for_port
from tests.integration.test_s3_storage import moto
from tests.integration.test_tune import mlflow_children, trials

pytestmark = pytest.mark.integration


def ray_node(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A raylet of one CPU; its trials get its environment (`extra_env`: a team's exported credentials)."""
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", *args],
        env=env({"RAY_USAGE_STATS_ENABLED": "0", **AWS, **(extra_env or {})}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_nodes(address: str, n: int, timeout: float = 120) -> None:
    probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(x['Alive'] for x in ray.nodes()))"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe % address], capture_output=True, text=True, env=env())
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster at {address} does not have {n} nodes after {timeout}s")


@pytest.fixture
def s3_endpoint():
    yield from moto()


def test_a_sweep_spreads_over_two_nodes_keeps_checkpoints_on_s3_and_outlives_a_dead_node(
    project: Path, s3_endpoint: str
):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket="team")
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's unix sockets live under --temp-dir: keep it short (socket paths are limited to 107 bytes)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    head = ray_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}")
    nodes = [head]
    try:
        wait_for_port(port)
        nodes.append(ray_node(f"--address={address}"))
        wait_for_nodes(address, 2)
        # what tells the stages to ship an image store through storage.root (pipeline.io.store_shipping)
        probe = f"import ray; from pipeline.ray import distributed; ray.init(address={address!r}); print(distributed.other_nodes())"
        assert sh(project, sys.executable, "-c", probe).stdout.split()[-1:] == ["True"]
        sh(project, sys.executable, "stages/prepare.py")
        space = {"train.lr_g": {"loguniform": [5e-4, 2e-3]}}
        set_params(
            project,
            {
                "storage": {"root": "s3://team/ganpipe/ray", "s3_endpoint_url": s3_endpoint},
                "tune": {"num_samples": 6, "scheduler": "none", "max_concurrent": 2, "search_space": space},
                "train": {"steps": 300, "checkpoint_every": 100, "log_every": 50, "ema": 0.0, "max_failures": 2},
            },
        )
        driver = spawn(project, sys.executable, "stages/tune.py", extra_env={**AWS, "RAY_ADDRESS": address})
        lines = []
        try:
            for line in driver.stdout:  # the worker node dies once the first trial has ended
                lines.append(line)
                if line.startswith("[tune] trial "):
                    os.killpg(nodes[1].pid, signal.SIGKILL)
                    break
            lines += driver.stdout.readlines()
            assert driver.wait(timeout=600) == 0, "".join(lines)
        finally:
            stop_group(driver)
        out = "".join(lines)
        assert f"joined Ray cluster at {address}" in out, out
        rows = trials(project)
        assert len(rows) == 6 and all(r["status"] == "finished" for r in rows), rows
        _, _, children = mlflow_children(project)
        where = {c.data.tags["ganpipe.node"] for c in children}
        assert len(children) == 6 and len(where) == 2, where  # one CPU a node, two trials at a time: both nodes
        # the trials of the dead node started again (from their checkpoints in the bucket) and finished
        assert "starting it again from its last checkpoint" in out, out
        assert "0 failed | all ended" in out, out
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team", Prefix="ganpipe/ray/").get("Contents", [])]
        states = {k.split("/")[3] for k in keys if k.endswith("/state.pt")}  # one trial folder each
        assert len(states) == 6, keys
        assert not any((project / ".ganpipe").rglob("state.pt"))  # nothing kept on a local path
    finally:
        for node in reversed(nodes):
            stop_group(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
