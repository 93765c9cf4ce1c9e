"""pipeline.io.s3: the one endpoint setting, retries, URI handling (no network)."""

from __future__ import annotations

import pytest

from pipeline.io import s3


def test_endpoint_precedence_params_then_service_variable_then_global_variable():
    env = {"AWS_ENDPOINT_URL": "http://global:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2"}
    assert s3.endpoint_url("http://params:3", env) == "http://params:3"
    assert s3.endpoint_url(None, env) == "http://s3only:2"
    assert s3.endpoint_url(None, {"AWS_ENDPOINT_URL": "http://global:1"}) == "http://global:1"
    assert s3.endpoint_url(None, {}) is None  # AWS itself


def test_every_tool_gets_the_endpoint_and_standard_retries():
    env = s3.tool_env("http://127.0.0.1:9000")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    assert env["AWS_RETRY_MODE"] == "standard" and int(env["AWS_MAX_ATTEMPTS"]) > 1
    assert "MLFLOW_S3_ENDPOINT_URL" not in s3.tool_env(None)

    c = s3.client("http://127.0.0.1:9000")
    assert c.meta.endpoint_url == "http://127.0.0.1:9000"
    assert (
        c.meta.config.retries["mode"] == "standard" and c.meta.config.retries["total_max_attempts"] == s3.MAX_ATTEMPTS
    )

    fs = s3.arrow_filesystem("http://127.0.0.1:9000", "us-east-1")
    assert fs.type_name == "s3" and fs.__reduce__()[1][0]["endpoint_override"] == "http://127.0.0.1:9000"


def test_split_and_a_bucketless_uri():
    assert s3.split("s3://bucket/a/b.npz") == ("bucket", "a/b.npz")
    assert s3.split("s3://bucket") == ("bucket", "")
    with pytest.raises(s3.S3Error, match="no bucket name"):
        s3.split("s3:///key")
