"""A pyarrow filesystem that does not upload again what it already wrote: Tune's sweep folder on S3.

Tune snapshots its experiment folder to storage.root after every trial checkpoint, and each snapshot
copies the whole folder again: every trial's params.json, params.pkl and result.json, although only
the running trials' results changed. A sweep of n trials thus costs O(n^2) PUTs (and a directory
check before each), which is what stopped sweeps of hundreds of trials on S3 (issue #18).

`skipping_unchanged(fs)` wraps a filesystem so that a write of the same bytes to the same path as this
process's last write there is not sent again (SHA-256 of the content), nor a directory made twice.
What it does not know is sent as before: the memory is per process (a resumed sweep, each trial
process and each node start empty), and deleting, moving or appending under a path forgets it. Writes
are spooled (to memory, to a temporary file past 8 MiB: checkpoints) and sent in one piece when
closed, one upload at a time.

Ray copies folders into any filesystem that is not pyarrow's own S3 class from pyarrow's I/O threads,
so these writes run on that pool: the S3 filesystem wrapped must send each write from the calling
thread (`s3.arrow_filesystem(..., background_writes=False)`, as `distributed.storage_filesystem`
builds it), or its writes wait for pool threads that are all waiting for them.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from typing import Any

import pyarrow.fs as pafs

SPOOL_BYTES = 8 << 20
_CHUNK = 8 << 20


def skipping_unchanged(fs: pafs.FileSystem) -> pafs.FileSystem:
    return pafs.PyFileSystem(UnchangedSkipping(fs))


class UnchangedSkipping(pafs.FileSystemHandler):
    def __init__(self, inner: pafs.FileSystem):
        self.inner = inner
        self._sent: dict[str, str] = {}  # path -> SHA-256 of the bytes this process last wrote there
        self._dirs: set[str] = set()
        self._lock = threading.Lock()  # the memory
        self._upload = threading.Lock()  # one upload at a time

    def __reduce__(self):  # another process starts with an empty memory
        return (UnchangedSkipping, (self.inner,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnchangedSkipping) and self.inner.equals(other.inner)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def sent(self, path: str) -> str | None:
        """The SHA-256 of what this process last wrote at `path`, if it still stands."""
        with self._lock:
            return self._sent.get(path)

    def _forget(self, path: str) -> None:
        path = path.rstrip("/")
        with self._lock:
            for known in [p for p in self._sent if p == path or p.startswith(path + "/")]:
                del self._sent[known]
            self._dirs -= {d for d in self._dirs if d == path or d.startswith(path + "/")}

    def _forget_all(self) -> None:
        with self._lock:
            self._sent.clear()
            self._dirs.clear()

    # writes: remembered
    def open_output_stream(self, path: str, metadata: Any) -> Any:
        import pyarrow

        return pyarrow.PythonFile(_Spooled(self, path, metadata), mode="w")

    def _finish(self, path: str, spool: Any, digest: str, metadata: Any) -> None:
        if self.sent(path) == digest:
            return
        self._forget(path)  # a failed upload leaves the path unknown
        with self._upload, self.inner.open_output_stream(path, metadata=metadata) as out:
            spool.seek(0)
            while chunk := spool.read(_CHUNK):
                out.write(chunk)
        with self._lock:
            self._sent[path] = digest

    def create_dir(self, path: str, recursive: bool) -> None:
        key = path.rstrip("/")
        with self._lock:
            if key in self._dirs:
                return
        self.inner.create_dir(path, recursive=recursive)
        with self._lock:
            self._dirs.add(key)

    # changes made another way: forgotten
    def open_append_stream(self, path: str, metadata: Any) -> Any:
        self._forget(path)
        return self.inner.open_append_stream(path, metadata=metadata)

    def delete_dir(self, path: str) -> None:
        self._forget(path)
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._forget(path)
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._forget_all()
        self.inner.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self._forget(path)
        self.inner.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._forget(src)
        self._forget(dest)
        self.inner.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._forget(dest)
        self.inner.copy_file(src, dest)

    # reads: passed through
    def get_type_name(self) -> str:
        return f"unchanged-skipping+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def open_input_stream(self, path: str) -> Any:
        return self.inner.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.inner.open_input_file(path)


class _Spooled:
    """A write in progress: spooled and hashed; sent (or not) when closed."""

    def __init__(self, owner: UnchangedSkipping, path: str, metadata: Any):
        self.owner, self.path, self.metadata = owner, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.hash = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        return self.spool.write(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.owner._finish(self.path, self.spool, self.hash.hexdigest(), self.metadata)
        finally:
            self.spool.close()
