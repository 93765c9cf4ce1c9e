"""The prepared image store on a Ray cluster whose nodes share no disk: shipped through storage.root.

A worker maps the memory-mapped store (data.StoreFile) at the driver's path when its node has it (the
same machine, or a shared path: a file of the same size and modification time). When the cluster has
other nodes and `storage.root` is on S3, the driver also uploads the store's file once to
`<storage.root>/stores/<sha256>.npy`: the key is the file's content, so a store already there (sent
by an earlier run) is not sent again.
A worker on a node without the file fetches it once per node into a node-local cache
(`$GANPIPE_STORE_CACHE`, else `<tmp>/ganpipe-stores`), checks its SHA-256, and maps it from there;
the workers of one node wait for the first one's download (a file lock) instead of downloading too.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core.data import StoreFile
from pipeline.core.datasets import DataError
from pipeline.io import s3

CACHE_ENV = "GANPIPE_STORE_CACHE"
_CHUNK = 8 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remote_uri(root: str, sha256: str) -> str:
    return f"{root.rstrip('/')}/stores/{sha256}.npy"


def publish(store: StoreFile, root: str, endpoint: str | None, say: Callable[[str], None] = print) -> StoreFile:
    """Upload the store's file under `root` (an s3:// URI) unless it is there; the StoreFile that
    says where the other nodes fetch it."""
    st = os.stat(store.path)
    size = st.st_size
    sha = sha256_file(store.path)
    uri = remote_uri(root, sha)
    what = "storage.root (the image store shipped to the cluster's nodes)"
    there = s3.object_metadata(uri, endpoint, what)
    if there is not None and there.get("sha256") == sha:
        say(f"the image store {Path(store.path).name} is on {uri} already")
    else:
        say(f"shipping the image store {Path(store.path).name} ({size / 2**20:.0f} MiB) to {uri} for the other nodes")
        s3.upload_file(store.path, uri, endpoint, what, {"sha256": sha})
    return dataclasses.replace(store, remote=uri, sha256=sha, size=size, mtime_ns=st.st_mtime_ns, endpoint=endpoint)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir(), "ganpipe-stores"))


def fetch(store: StoreFile) -> Path:
    """This node's copy of a shipped store: fetched once per node, verified by its SHA-256."""
    cache = cache_dir()
    target = cache / f"{store.sha256}.npy"
    if target.is_file() and target.stat().st_size == store.size:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{store.sha256}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker of this node may be fetching it: wait for it
        if target.is_file() and target.stat().st_size == store.size:
            return target
        part = cache / f"{store.sha256}.npy.part-{os.getpid()}"
        try:
            s3.download_file(store.remote, part, store.endpoint, "the image store shipped through storage.root")
            got = sha256_file(part)
            if got != store.sha256:
                raise DataError(
                    f"{store.remote}: the image store fetched to node {socket.gethostname()} has SHA-256 "
                    f"{got[:16]}..., not {store.sha256[:16]}... as shipped (changed on storage or corrupted "
                    "in transit); delete that object and rerun the stage: it ships the store again"
                )
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    return target


def open_store(store: StoreFile) -> np.ndarray:
    """Map a store on a worker: the driver's file if this node has it, else this node's fetched copy."""
    if store.local() or store.remote is None:
        return store.open()
    return store.open(fetch(store))


def ship(shipped, root: str, endpoint: str | None, other_nodes: bool, say: Callable[[str], None] = print):
    """The worker data (runtime.WorkerData), its stores published under `root` when the cluster has
    other nodes and `root` is on S3; unchanged otherwise (one node, or a shared storage root)."""
    if not (other_nodes and root.startswith("s3://")):
        return shipped
    stores = {
        f.name: publish(v, root, endpoint, say)
        for f in dataclasses.fields(shipped)
        if isinstance(v := getattr(shipped, f.name), StoreFile)
    }
    return dataclasses.replace(shipped, **stores) if stores else shipped
