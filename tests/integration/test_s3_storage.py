"""S3 on a real endpoint on loopback (moto's server): Ray checkpoints written and resumed from, npz data read,
missing buckets and objects and denied access named before any work, the DVC remote command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.io.teamstack import LOCAL_AWS as AWS
from pipeline.io.teamstack import s3_client
from tests.integration.conftest import BIN, ROOT, env, free_port, set_params, sh, stop_group, wait_for_port

pytestmark = pytest.mark.integration


def moto(extra: dict[str, str] | None = None, with_process: bool = False):
    port = free_port()
    p = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env({**AWS, **(extra or {})}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield (f"http://127.0.0.1:{port}", p) if with_process else f"http://127.0.0.1:{port}"
    finally:
        os.killpg(p.pid, signal.SIGCONT)  # a stalled server must be able to stop
        stop_group(p)


@pytest.fixture
def s3_endpoint():
    yield from moto()


@pytest.fixture
def s3_endpoint_with_iam():
    """moto checking credentials against its IAM from the first request: unknown keys are refused."""
    yield from moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})


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
    info = json.loads((project / "models/run.json").read_text())
    assert info["ray_result_path"].startswith("team/ganpipe/ray/")
    assert len(states) <= 2  # train.keep_checkpoints

    second = sh(project, sys.executable, "stages/train.py", extra_env=AWS)
    assert "this run already finished (step 300): handing it back" in second.stdout, first.stdout + second.stdout
    # credentials never reach MLflow params
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_run(info["mlflow_run_id"])
    assert not any("testing-secret" in str(v) for v in run.data.params.values())


def test_npz_data_is_read_from_s3_with_the_endpoint_from_the_environment(project: Path, s3_endpoint: str):
    import io

    import numpy as np

    x = np.random.default_rng(1).standard_normal((400, 2)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="sets/points.npz", Body=buf.getvalue())
    (project / "points.npz").write_bytes(buf.getvalue())

    # the same file, local and on S3, gives the same prepared arrays (the manifest's content hash)
    set_params(project, {"data": {"name": "npz", "path": "points.npz"}})
    sh(project, sys.executable, "stages/prepare.py")
    local = json.loads((project / "data/prepared/manifest.json").read_text())
    set_params(project, {"data": {"path": "s3://data/sets/points.npz"}})  # no storage.s3_endpoint_url
    sh(project, sys.executable, "stages/prepare.py", extra_env={**AWS, "AWS_ENDPOINT_URL": s3_endpoint})
    remote = json.loads((project / "data/prepared/manifest.json").read_text())
    assert remote["content_hash"] == local["content_hash"] and remote["n_train"] + remote["n_val"] == 400

    # a missing object is named, and the earlier outputs stay as they were
    set_params(project, {"data": {"path": "s3://data/sets/missing.npz"}})
    p = sh(
        project, sys.executable, "stages/prepare.py", check=False, extra_env={**AWS, "AWS_ENDPOINT_URL": s3_endpoint}
    )
    assert p.returncode == 1 and "data.path: no S3 object s3://data/sets/missing.npz" in p.stderr, p.stderr
    assert json.loads((project / "data/prepared/manifest.json").read_text()) == remote


def test_a_missing_bucket_stops_the_stage_before_any_work(project: Path, s3_endpoint: str):
    set_params(project, {"data": {"name": "npz", "path": "s3://no-such-data/points.npz"}})
    set_params(project, {"storage": {"s3_endpoint_url": s3_endpoint}})
    p = sh(project, sys.executable, "stages/prepare.py", check=False, extra_env=AWS)
    assert p.returncode == 1, p.stderr
    assert (
        p.stderr.strip()
        == f"error: data.path: S3 bucket 'no-such-data' does not exist at {s3_endpoint} (s3://no-such-data)"
    )
    assert not (project / "data/prepared").exists()

    set_params(project, {"data": {"name": "grid", "path": None}})
    sh(project, sys.executable, "stages/prepare.py", extra_env=AWS)
    set_params(project, {"storage": {"root": "s3://no-such-bucket/ganpipe/ray"}})
    t0 = time.perf_counter()
    p = sh(project, sys.executable, "stages/train.py", check=False, extra_env=AWS)
    assert p.returncode == 1
    assert "storage.root: S3 bucket 'no-such-bucket' does not exist" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1  # one message, no traceback
    assert time.perf_counter() - t0 < 60 and "[train] MLflow run" not in p.stdout  # before Ray and MLflow
    assert not (project / "models").exists() and not (project / "metrics/train.json").exists()
    assert not (project / "mlflow.db").exists()  # no MLflow run was opened


def test_ganpipe_remote_points_dvc_at_the_one_endpoint(project: Path):
    set_params(project, {"storage": {"s3_endpoint_url": "http://127.0.0.1:9999"}})
    p = sh(project, sys.executable, "-m", "pipeline.cli", "remote", "s3://team/dvcstore")
    assert "DVC remote team -> s3://team/dvcstore at http://127.0.0.1:9999" in p.stdout
    assert sh(project, "dvc", "remote", "default").stdout.strip() == "team"
    assert sh(project, "dvc", "config", "--local", "remote.team.endpointurl").stdout.strip() == "http://127.0.0.1:9999"
    assert "endpointurl" not in (project / ".dvc/config").read_text()  # machine-specific: kept out of git

    set_params(project, {"storage": {"s3_endpoint_url": None}})  # the AWS variable is the one setting now
    sh(
        project,
        sys.executable,
        "-m",
        "pipeline.cli",
        "remote",
        "s3://team/dvcstore",
        extra_env={"AWS_ENDPOINT_URL": "http://minio:9000"},
    )
    assert sh(project, "dvc", "config", "--local", "remote.team.endpointurl").stdout.strip() == "http://minio:9000"
    bad = sh(project, sys.executable, "-m", "pipeline.cli", "remote", "/tmp/store", check=False)
    assert bad.returncode == 1 and "an s3:// URL is expected, got /tmp/store" in bad.stderr


def test_denied_access_stops_the_train_stage_before_any_work(project: Path, s3_endpoint_with_iam: str):
    sh(project, sys.executable, "stages/prepare.py")
    set_params(project, {"storage": {"root": "s3://team/ganpipe/ray", "s3_endpoint_url": s3_endpoint_with_iam}})
    p = sh(project, sys.executable, "stages/train.py", check=False, extra_env=AWS)
    assert p.returncode == 1
    assert p.stderr.strip() == (
        f"error: storage.root: access denied to S3 bucket 'team' at {s3_endpoint_with_iam} (s3://team; error 403)"
    )
    assert AWS["AWS_SECRET_ACCESS_KEY"] not in p.stdout + p.stderr
    assert not (project / "models").exists() and not (project / "metrics/train.json").exists()
    assert not (project / "mlflow.db").exists()


@pytest.fixture
def s3_read_only_user():
    """moto with IAM: a bucket, and a user whose policy lets it list and read it but not write."""
    setup_actions = 4  # requests moto takes without credentials checks: the set-up below
    for endpoint in moto({"INITIAL_NO_AUTH_ACTION_COUNT": str(setup_actions)}):
        s3_client(endpoint).create_bucket(Bucket="team")
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **_boto_keys(AWS))
        iam.create_user(UserName="reader")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:List*", "s3:Get*", "s3:Head*"], "Resource": "*"}],
        }
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield endpoint, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _boto_keys(env_vars: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env_vars["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env_vars["AWS_SECRET_ACCESS_KEY"],
    }


def test_credentials_that_cannot_write_stop_the_train_stage_before_any_work(project: Path, s3_read_only_user):
    endpoint, keys = s3_read_only_user
    sh(project, sys.executable, "stages/prepare.py")
    set_params(project, {"storage": {"root": "s3://team/ganpipe/ray", "s3_endpoint_url": endpoint}})
    p = sh(project, sys.executable, "stages/train.py", check=False, extra_env={**AWS, **keys})
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    line = p.stderr.strip()
    assert line.startswith(
        f"error: storage.root (a test write): access denied to S3 bucket 'team' at {endpoint} "
        "(s3://team/ganpipe/ray/.ganpipe-write-probe-"
    ), line
    assert keys["AWS_SECRET_ACCESS_KEY"] not in p.stdout + p.stderr
    assert not (project / "mlflow.db").exists() and not (project / "models").exists()


def test_a_local_storage_root_that_cannot_be_written_stops_the_stage_before_any_work(project: Path):
    sh(project, sys.executable, "stages/prepare.py")
    set_params(project, {"storage": {"root": "params.yaml/ray"}})  # under a file: no folder can be made
    p = sh(project, sys.executable, "stages/train.py", check=False)
    assert p.returncode == 1
    assert p.stderr.strip().startswith(f"error: storage.root: cannot write to {project / 'params.yaml/ray'}")
    assert not (project / "mlflow.db").exists()


def test_an_s3_endpoint_that_stalls_mid_run_is_survived_or_named_and_the_rerun_resumes_exactly(
    project: Path, tmp_path: Path
):
    """The S3 server process is stopped (SIGSTOP) while training writes checkpoints, and continued 8 s
    later: the stage either rides it out on retries or fails with one line; the rerun ends with the
    weights of a run that never met a stall."""
    import shutil

    import torch

    from tests.integration.conftest import spawn
    from tests.integration.test_tracking_outage import Lines

    for endpoint, server in moto(with_process=True):
        s3_client(endpoint).create_bucket(Bucket="team")
        run = {"steps": 3000, "checkpoint_every": 200, "log_every": 100}
        set_params(project, {"storage": {"root": "s3://team/stall", "s3_endpoint_url": endpoint}, "train": run})
        reference = tmp_path / "reference"
        shutil.copytree(project, reference)
        set_params(reference, {"storage": {"root": "s3://team/reference"}})
        for p in (project, reference):
            sh(p, sys.executable, "stages/prepare.py")

        train = spawn(project, sys.executable, "stages/train.py", extra_env=AWS)
        try:
            out = Lines(train)
            out.wait_for_step(train, 300, timeout=300)
            assert out.steps(), out.text()
            os.killpg(server.pid, signal.SIGSTOP)
            time.sleep(8)
            os.killpg(server.pid, signal.SIGCONT)
            rc = train.wait(timeout=600)
            out.thread.join(timeout=10)
        finally:
            stop_group(train)
        text = out.text()
        assert "Traceback" not in text, text[-4000:]
        if rc != 0:  # failed: in one line
            assert rc == 1 and len([line for line in text.splitlines() if line.startswith("error: ")]) == 1, text
        sh(project, sys.executable, "stages/train.py", extra_env=AWS)  # resumes, or hands the run back
        sh(reference, sys.executable, "stages/train.py", extra_env=AWS)  # never stalled
        got, want = (torch.load(p / "models/generator.pt", weights_only=True) for p in (project, reference))
        assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_pruned_checkpoint_is_given_back_from_the_newest_on_a_bucket_or_a_disk(
    where: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What a resumed sweep does for a trial whose snapshot names a checkpoint Tune has deleted since
    (pipeline.ray.sweep_state): the newest checkpoint by number (not by name) is copied under that name."""
    import pyarrow.fs as pafs

    from pipeline.ray import distributed, sweep_state

    if where == "s3":
        s3_client(s3_endpoint).create_bucket(Bucket="team")
        for k, v in AWS.items():  # pyarrow reads the credentials when it first calls S3
            monkeypatch.setenv(k, v)
        root, fs = distributed.storage_filesystem("s3://team/ray", s3_endpoint)
    else:
        root, fs = str(tmp_path), pafs.LocalFileSystem()
    trial = f"{root}/sweep/run_trial_c5f4d_00001_1"
    for n, body in ((9, b"older"), (10, b"newest"), (7, b"oldest")):
        fs.create_dir(f"{trial}/checkpoint_{n:06d}", recursive=True)
        with fs.open_output_stream(f"{trial}/checkpoint_{n:06d}/state.pt") as f:
            f.write(body)
    newest = sweep_state.newest_checkpoint(fs, trial)
    assert newest.endswith("checkpoint_000010")
    sweep_state.copy_checkpoint(fs, newest, f"{trial}/checkpoint_000008")
    with fs.open_input_stream(f"{trial}/checkpoint_000008/state.pt") as f:
        assert f.readall() == b"newest"
    assert sweep_state.newest_checkpoint(fs, f"{root}/sweep/no_such_trial") is None


def test_an_image_store_is_shipped_once_through_storage_root_and_fetched_once_per_node_by_hash(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A node that does not share the driver's disk maps the prepared image store from its own copy,
    fetched from storage.root on S3 once and checked by SHA-256; the driver sends it once
    (pipeline.io.store_shipping)."""
    from dataclasses import replace

    import numpy as np
    import torch

    from pipeline.core.datasets import DataError
    from pipeline.io import store_shipping
    from pipeline.ray import runtime

    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket="team")
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    cache = tmp_path / "node-cache"
    monkeypatch.setenv(store_shipping.CACHE_ENV, str(cache))
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x_train.npy", images)
    store = np.load(tmp_path / "x_train.npy", mmap_mode="r")
    said: list[str] = []

    def ship(other_nodes: bool) -> runtime.WorkerData:
        return store_shipping.ship(
            runtime.WorkerData.ship(store), "s3://team/ray", s3_endpoint, other_nodes, say=said.append
        )

    assert ship(False).x.remote is None and not said  # one node: nothing to ship
    x = ship(True).x
    sha = store_shipping.sha256_file(tmp_path / "x_train.npy")
    assert x.remote == f"s3://team/ray/stores/{sha}.npy" and x.sha256 == sha, x
    assert "shipping the image store x_train.npy" in said[0], said
    key = f"ray/stores/{sha}.npy"
    sent = s3.head_object(Bucket="team", Key=key)["LastModified"]
    assert ship(True).x == x and "is on s3://team/ray/stores/" in said[1], said  # a rerun sends nothing
    assert s3.head_object(Bucket="team", Key=key)["LastModified"] == sent

    assert torch.equal(runtime.as_tensor(x), torch.from_numpy(images))  # the driver's node: its own file
    assert not cache.exists()
    elsewhere = replace(x, path=str(tmp_path / "another-node" / "x_train.npy"))  # not at the driver's path
    assert torch.equal(runtime.as_tensor(elsewhere), torch.from_numpy(images))
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.lock", f"{sha}.npy"]
    s3.delete_object(Bucket="team", Key=key)  # once per node: the next worker maps the node's copy
    assert torch.equal(runtime.as_tensor(elsewhere), torch.from_numpy(images))
    # a store of the same shape prepared at the driver's path on that node (another data version) is not it
    other = tmp_path / "another-node" / "x_train.npy"
    other.parent.mkdir()
    np.save(other, 255 - images)
    assert other.stat().st_size == x.size and not elsewhere.local()
    assert torch.equal(runtime.as_tensor(elsewhere), torch.from_numpy(images))

    # a store changed on storage is refused by its hash, and nothing half-fetched stays on the node
    (cache / f"{sha}.npy").unlink()
    s3.put_object(Bucket="team", Key=key, Body=b"not the store")
    with pytest.raises(DataError, match=r"has SHA-256 .* not .* as shipped"):
        runtime.as_tensor(elsewhere)
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.lock"]


_SNAPSHOTS = """
import json, sys
from pathlib import Path
import pyarrow.fs as pafs
from pipeline.io.teamstack import s3_client
from pipeline.ray import distributed

endpoint, src = sys.argv[1], Path(sys.argv[2])
root, fs = distributed.storage_filesystem("s3://team/ray", endpoint, skip_unchanged=True)

def snapshot():  # what Ray does for a sweep snapshot: the folder, then the tree from pyarrow's threads
    fs.create_dir(f"{root}/sweep", recursive=True)
    pafs.copy_files(str(src), f"{root}/sweep", destination_filesystem=fs, use_threads=True)

snapshot()
client = s3_client(endpoint)
listed = client.list_objects_v2(Bucket="team", Prefix="ray/sweep/")["Contents"]
keys = [o["Key"] for o in listed if not o["Key"].endswith("/")]  # (pyarrow marks folders with empty objects)
first = {k: client.get_object(Bucket="team", Key=k)["Body"].read().decode() for k in keys}
for k in keys:  # behind the filesystem's back: whatever the next snapshot sends shows
    client.put_object(Bucket="team", Key=k, Body=b"tampered")
(src / "trial_007" / "result.json").write_text("step 100")
snapshot()
resent = sorted(k for k in keys if client.get_object(Bucket="team", Key=k)["Body"].read() != b"tampered")
print(json.dumps({"first": first, "resent": resent}))
"""


def test_sweep_snapshots_from_pyarrows_threads_send_only_what_changed(s3_endpoint: str, tmp_path: Path):
    """Tune's snapshot of a sweep folder, as Ray sends it (pyarrow's copy_files on its I/O threads),
    through the sweep's filesystem on S3: the second sends only the file that changed. With more
    files than pyarrow has I/O threads, S3 writes queued on that same pool would wait on each other for
    ever: the run is bounded, and a hang fails the test."""
    s3_client(s3_endpoint).create_bucket(Bucket="team")
    src = tmp_path / "sweep"
    for i in range(40):
        (src / f"trial_{i:03d}").mkdir(parents=True)
        for name in ("params.json", "params.pkl", "result.json"):
            (src / f"trial_{i:03d}" / name).write_text(f"{name} of trial {i}")
    try:
        p = subprocess.run(
            [sys.executable, "-c", _SNAPSHOTS, s3_endpoint, str(src)],
            env=env(AWS, ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a snapshot of 120 files through the sweep's S3 filesystem did not finish in 120 s")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["first"]) == 120 and out["first"]["ray/sweep/trial_003/params.pkl"] == "params.pkl of trial 3"
    assert out["resent"] == ["ray/sweep/trial_007/result.json"]
