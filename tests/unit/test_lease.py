"""pipeline.io.lease: one process at a time per run under storage.root; a dead or silent owner's lease is free."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from pipeline.io.lease import Lease, LeaseHeld

FS = pafs.LocalFileSystem()


def test_a_second_holder_is_refused_naming_the_first_and_the_run_is_free_after_release(tmp_path):
    run = str(tmp_path / "runs/ganpipe-grid-abc")
    first = Lease(FS, run, "the run ganpipe-grid-abc")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as info:
            Lease(FS, run, "the run ganpipe-grid-abc").acquire()
        msg = str(info.value)
        assert msg.startswith("storage.root: the run ganpipe-grid-abc is being run by ")
        assert f"pid {first.pid}" in msg and run + ".lease.json" in msg
    finally:
        first.release()
    assert not (tmp_path / "runs/ganpipe-grid-abc.lease.json").exists()
    with Lease(FS, run, "the run"):  # free again
        pass


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Lease(FS, run, "the run")
    stale.pid = dead.pid  # written as if by the process that died
    stale._write()
    with Lease(FS, run, "the run") as lease:
        assert json.loads((tmp_path / "run.lease.json").read_text())["token"] == lease.token


def test_an_expired_lease_is_free_and_a_live_one_is_renewed(tmp_path):
    run = str(tmp_path / "run")
    other = Lease(FS, run, "the run", ttl=0.5)
    other.host = "another-host"  # its pid cannot be checked from here: only the expiry frees it
    other._write()
    with pytest.raises(LeaseHeld):
        Lease(FS, run, "the run").acquire()
    time.sleep(0.6)
    with Lease(FS, run, "the run", ttl=1.0, renew=0.2) as mine:
        before = json.loads((tmp_path / "run.lease.json").read_text())["expires"]
        time.sleep(0.5)
        after = json.loads((tmp_path / "run.lease.json").read_text())["expires"]
        assert after > before  # renewed while held
        assert mine.holder() is None
