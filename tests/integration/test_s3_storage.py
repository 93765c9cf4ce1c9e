"""Ray checkpoints on S3 (a real S3 endpoint on loopback: moto's server), written and resumed from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, env, free_port, set_params, sh, stop_group, wait_for_port

pytestmark = pytest.mark.integration
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint():
    port = free_port()
    p = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env(AWS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(p)


def test_checkpoints_go_to_s3_and_a_rerun_resumes_from_them(project: Path, s3_endpoint: str):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        **{
            "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
            "region_name": AWS["AWS_DEFAULT_REGION"],
        },
    )
    s3.create_bucket(Bucket="team")
    sh(project, sys.executable, "stages/prepare.py")
    set_params(project, {"storage": {"root": "s3://team/ganpipe/ray", "s3_endpoint_url": s3_endpoint}})

    first = sh(project, sys.executable, "stages/train.py", extra_env=AWS)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team", Prefix="ganpipe/ray/").get("Contents", [])]
    states = [k for k in keys if k.endswith("/state.pt")]
    assert states, keys
    info = json.loads((project / "metrics/train.json").read_text())
    assert info["ray_result_path"].startswith("team/ganpipe/ray/")
    assert len(states) <= 2  # train.keep_checkpoints

    second = sh(project, sys.executable, "stages/train.py", extra_env=AWS)
    assert "resuming from checkpoint at step 300" in second.stdout, first.stdout + second.stdout
    # credentials never reach MLflow params
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_run(info["mlflow_run_id"])
    assert not any("testing-secret" in str(v) for v in run.data.params.values())
