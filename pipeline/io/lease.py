"""Who is running a run: a lease file beside the run's checkpoints under `storage.root`.

Ray keeps a run's checkpoints at storage root + run name, and a second process with the same run
identity would resume, prune and overwrite them while the first is still writing. The lease stops
it: `<run>.lease.json` beside the run's folder names its owner (user, host, pid) and an expiry, renewed while the
owner runs. A second run refuses with one line naming the owner; a lease whose owner is gone (a
dead pid on this host, or an expiry passed: a host that crashed) is taken over. Works on a local
folder and on S3 (pyarrow's filesystems); S3 has no atomic create, so after writing its lease a
process reads it back and yields if another one won the race.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

LEASE_SUFFIX = ".lease.json"
TTL_S = 120.0  # a lease not renewed for this long is free (its owner's host is gone)
RENEW_S = 30.0


class LeaseHeld(RuntimeError):
    """Another live process holds the run; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """`with Lease(fs, run_dir, what):` holds the run at `run_dir` (a path on the pyarrow filesystem
    `fs`) for the block, renewing it in a background thread."""

    def __init__(self, fs, run_dir: str, what: str, ttl: float = TTL_S, renew: float = RENEW_S):
        self.fs, self.what, self.ttl, self.renew = fs, what, ttl, renew
        self.path = run_dir.rstrip("/") + LEASE_SUFFIX
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except (OSError, ValueError):  # unreadable (half-written by a crash): treat as free
            return None

    def _write(self) -> None:
        now = time.time()
        body = {
            "owner": f"{getpass.getuser()}@{self.host} pid {self.pid}",
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "acquired_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "expires": now + self.ttl,
        }
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(body).encode())

    def holder(self) -> dict[str, Any] | None:
        """The live lease of another process, or None when the run is free."""
        held = self._read()
        if held is None or held.get("token") == self.token:
            return None
        if time.time() > float(held.get("expires", 0)):
            return None
        if held.get("host") == self.host and not _pid_alive(int(held.get("pid", -1))):
            return None
        return held

    def acquire(self) -> None:
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        for _ in range(2):
            if held := self.holder():
                raise LeaseHeld(
                    f"storage.root: {self.what} is being run by {held['owner']} since {held['acquired_at']} "
                    f"(lease {self.path}); wait for it to finish, or delete the lease if that process is gone"
                )
            self._write()
            time.sleep(0.2)  # S3 has no atomic create: whoever wrote last won; read it back
            if (self._read() or {}).get("token") == self.token:
                break
        else:
            raise LeaseHeld(f"storage.root: {self.what} was just taken by another process (lease {self.path})")
        self._thread = threading.Thread(target=self._keep, daemon=True, name="ganpipe-lease")
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.renew):
            try:
                self._write()
            except OSError:  # storage away for a moment: the next renewal tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self._read() or {}).get("token") == self.token:
                self.fs.delete_file(self.path)
        except OSError:  # it expires by itself
            pass

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
