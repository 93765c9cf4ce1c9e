"""Credentials in URIs never reach a written form: MLflow params, config.json, the model card, tune outputs."""

from __future__ import annotations

import json

import pytest

from pipeline.core.config import build_config, flatten
from pipeline.core.secrets import redact, redact_tree

SECRET = "s3cr3t-P@ss:w/rd"


@pytest.mark.parametrize(
    "uri",
    [
        "https://alice:s3cr3t-P%40ss%3Aw%2Frd@mlflow.example.org/",
        "https://alice:s3cr3t-P@ss@mlflow.example.org:5000",
        "postgresql://mlflow:s3cr3t-P%40ss@db:5432/mlflow?sslmode=require",
        "http://127.0.0.1:9000/?password=s3cr3t-P%40ss&region=x",
        "s3://bucket/key?X-Amz-Signature=s3cr3t-P%40ss",
    ],
)
def test_redact_removes_the_secret_in_any_spelling(uri: str):
    out = redact(uri)
    assert "s3cr3t" not in out and "***" in out
    assert out.split("://")[0] == uri.split("://")[0]  # the rest stays readable


def test_redact_leaves_plain_uris_alone():
    for uri in ("sqlite:///mlflow.db", "http://127.0.0.1:5000", "s3://bucket/prefix", "file:///tmp/x?a=1"):
        assert redact(uri) == uri


def test_public_config_has_no_secret_but_the_config_keeps_it():
    cfg = build_config(
        {
            "tracking": {"uri": "https://alice:s3cr3t@mlflow.example.org"},
            "storage": {"root": "s3://team/ray", "s3_endpoint_url": "http://key:s3cr3t@127.0.0.1:9000"},
        }
    )
    assert "s3cr3t" not in json.dumps(cfg.public_dict())
    assert all("s3cr3t" not in str(v) for v in flatten(cfg.public_dict()).values())
    assert "s3cr3t" in cfg.tracking.uri  # the run itself still connects with it


def test_redact_tree_masks_secret_named_keys():
    got = redact_tree({"a": {"password": "x", "aws_secret_access_key": "y", "n": 3, "uri": "http://u:p@h"}})
    assert got == {"a": {"password": "***", "aws_secret_access_key": "***", "n": 3, "uri": "http://***@h"}}
