"""S3: the one module that talks to boto3, and builds pyarrow's S3 filesystem for Ray.

One endpoint setting reaches every tool: `endpoint_url` resolves `storage.s3_endpoint_url`, else
AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (None = AWS itself); the stage passes the result to
boto3 (data), to pyarrow (Ray storage: it ignores the AWS_ENDPOINT_URL* variables) and exports it
as MLFLOW_S3_ENDPOINT_URL for MLflow's S3 artifact client. Credentials come only from the standard
AWS chain (environment, shared files, profile, instance role); nothing here reads or logs them.

Transient errors (throttling, 5xx, dropped connections, timeouts) are retried with exponential
backoff and jitter by botocore's `standard` retry mode and pyarrow's AwsStandardS3RetryStrategy;
a missing bucket, a missing object or denied access is not transient and raises `S3Error` at once,
naming the bucket or URI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MAX_ATTEMPTS = 5  # in all: the first try and 4 retries, backoff with jitter up to 20 s (botocore standard mode)
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class S3Error(RuntimeError):
    """An S3 location that cannot be used; the message names the setting and the bucket or URI."""


def endpoint_url(configured: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """storage.s3_endpoint_url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else None (AWS)."""
    env = os.environ if env is None else env
    if configured:
        return configured
    return next((env[k] for k in _ENDPOINT_VARS if env.get(k)), None)


def tool_env(endpoint: str | None) -> dict[str, str]:
    """Variables for the S3 clients this module does not build (MLflow's S3 artifact client, boto3 in
    child processes): the endpoint, and botocore's standard retries (backoff with jitter)."""
    env = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    if endpoint:
        env |= {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    return env


def split(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise S3Error(f"{uri}: no bucket name")
    return bucket, key


def client(endpoint: str | None, max_attempts: int = MAX_ATTEMPTS, connect_timeout: float = 5.0):
    """A boto3 S3 client with standard retries (backoff with jitter) and short connect timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _explain(e: Exception, what: str, uri: str, endpoint: str | None) -> S3Error:
    """One line for the user: which setting, which bucket or object, what went wrong."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, key = split(uri)
    at = f" at {endpoint}" if endpoint else ""
    if isinstance(e, NoCredentialsError):
        return S3Error(
            f"{what}: no AWS credentials for {uri} (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
        )
    if isinstance(e, EndpointConnectionError):
        return S3Error(f"{what}: cannot reach the S3 endpoint{at or ' of AWS'} for {uri} ({e})")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket") and (not key or code == "NoSuchBucket"):
            return S3Error(f"{what}: S3 bucket '{bucket}' does not exist{at} ({uri})")
        if code in ("404", "NoSuchKey"):
            return S3Error(f"{what}: no S3 object {uri}{at}")
        if code in ("403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3Error(f"{what}: access denied to S3 bucket '{bucket}'{at} ({uri}; error {code})")
        return S3Error(f"{what}: S3 error {code or type(e).__name__} for {uri}{at}")
    return S3Error(f"{what}: {type(e).__name__} for {uri}{at}: {e}")


def check(uri: str, what: str, endpoint: str | None, *, object_: bool = False, writable: bool = False) -> None:
    """Raise S3Error unless the bucket of `uri` exists and answers (and, with `object_`, the object
    exists; with `writable`, these credentials can write under `uri`: a probe object is written and
    deleted). Cheap requests, meant to run before any work starts."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    s3 = client(endpoint)
    try:
        s3.head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as e:
        raise _explain(e, what, f"s3://{bucket}", endpoint) from None
    if writable:
        import uuid

        probe = f"{key.rstrip('/')}/.ganpipe-write-probe-{uuid.uuid4().hex}".lstrip("/")
        try:
            s3.put_object(Bucket=bucket, Key=probe, Body=b"")
            s3.delete_object(Bucket=bucket, Key=probe)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"{what} (a test write)", f"s3://{bucket}/{probe}", endpoint) from None
    if object_:
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, what, uri, endpoint) from None


def read_bytes(uri: str, endpoint: str | None, what: str = "data.path") -> bytes:
    """The whole object at `uri` (retried on transient errors)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as e:
        raise _explain(e, what, uri, endpoint) from None


def arrow_filesystem(
    endpoint: str | None, region: str | None = None, max_attempts: int = MAX_ATTEMPTS, background_writes: bool = True
):
    """pyarrow's S3FileSystem (what Ray writes checkpoints through), with the endpoint given
    explicitly and AWS's standard retry strategy (exponential backoff on transient errors).
    `background_writes=False`: each write is sent by the thread that closes it, not by pyarrow's I/O
    thread pool (a filesystem written from that pool's own threads would otherwise wait on itself)."""
    import pyarrow.fs

    kwargs: dict = {
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
        "background_writes": background_writes,
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    if region:
        kwargs["region"] = region
    return pyarrow.fs.S3FileSystem(**kwargs)


def list_keys(uri: str, endpoint: str | None, what: str = "data.path") -> list[str]:
    """Every object key under the prefix `uri` (s3://bucket/prefix), paginated."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    keys: list[str] = []
    try:
        for page in client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as e:
        raise _explain(e, what, uri, endpoint) from None
    return keys


class Reader:
    """What a dataset loader is given to read remote data: called with an s3:// URI it returns the
    object's bytes; `list(uri)` lists the s3:// URIs under a prefix. Picklable (it holds only the
    endpoint), so processes decoding in parallel each build their own client."""

    def __init__(self, endpoint: str | None):
        self.endpoint = endpoint
        self._client = None

    def __getstate__(self) -> dict:
        return {"endpoint": self.endpoint, "_client": None}

    def __call__(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = client(self.endpoint)
        bucket, key = split(uri)
        try:
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, "data.path", uri, self.endpoint) from None

    def list(self, uri: str) -> list[str]:
        bucket, _ = split(uri)
        return [f"s3://{bucket}/{k}" for k in list_keys(uri, self.endpoint)]


def object_metadata(uri: str, endpoint: str | None, what: str) -> dict[str, str] | None:
    """The user metadata of the object at `uri` (x-amz-meta-*), or None if there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return client(endpoint).head_object(Bucket=bucket, Key=key).get("Metadata", {})
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _explain(e, what, uri, endpoint) from None
    except BotoCoreError as e:
        raise _explain(e, what, uri, endpoint) from None


def upload_file(path: str | os.PathLike, uri: str, endpoint: str | None, what: str, metadata: dict[str, str]) -> None:
    """Upload a local file to `uri` (multipart for large files), with user `metadata`."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client(endpoint).upload_file(str(path), bucket, key, ExtraArgs={"Metadata": metadata})
    except (BotoCoreError, ClientError) as e:
        raise _explain(e, what, uri, endpoint) from None


def download_file(uri: str, path: str | os.PathLike, endpoint: str | None, what: str) -> None:
    """Download the object at `uri` to the local file `path` (ranged, in parallel, for large objects)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client(endpoint).download_file(bucket, key, str(path))
    except (BotoCoreError, ClientError) as e:
        raise _explain(e, what, uri, endpoint) from None
