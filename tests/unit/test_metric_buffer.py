"""tracking.MetricBuffer without a server to talk to, and with a local store: no mocks."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

# imported up front: the buffer's sender thread makes MLflow's client itself, and these tests' short
# timeouts time the server, not that first import
import mlflow

from pipeline.io import tracking


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_server_away_never_blocks_and_spills_every_step_in_order(tmp_path: Path):
    lines: list[str] = []
    spill = tmp_path / "unsent" / "run.jsonl"
    buf = tracking.MetricBuffer(
        f"http://127.0.0.1:{closed_port()}", "run-1", spill, timeout=1.5, log=lambda m, **_: lines.append(m)
    )
    t0 = time.perf_counter()
    for step in range(10, 110, 10):
        buf.add(step, {"loss/D": step / 10, "loss/G": -step})
        buf.flush()
    assert time.perf_counter() - t0 < 0.5  # training does not wait on the absent server
    buf.flush(wait=True)
    rows = [json.loads(line) for line in spill.read_text().splitlines()]
    assert [r["step"] for r in rows if r["key"] == "loss/D"] == list(range(10, 110, 10))
    assert {r["run_id"] for r in rows} == {"run-1"} and len(rows) == 20
    assert buf.spilled == 20 and buf.delivered == 0
    assert any("not answering" in m for m in lines)
    assert any(str(spill) in m and "20 metric values were not logged" in m for m in lines)
    # the server is still away: the driver keeps the file
    assert tracking.deliver_spilled(f"http://127.0.0.1:{closed_port()}", spill) == 20 and spill.exists()


def test_local_store_gets_every_step_and_spilled_metrics_are_replayed(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_or_resume_run(uri, "buf", "key", "r")[0]
    buf = tracking.MetricBuffer(uri, run_id, tmp_path / "spill.jsonl", timeout=60)
    for step in range(1, 51):
        buf.add(step, {"loss/D": float(step)})
        buf.flush()
    buf.flush(wait=True)
    history = MlflowClient(uri).get_metric_history(run_id, "loss/D")
    assert sorted(m.step for m in history) == list(range(1, 51)) and buf.delivered == 50
    assert not (tmp_path / "spill.jsonl").exists()

    from mlflow.entities import Metric

    spill = tmp_path / "later.jsonl"
    tracking.write_spill(spill, run_id, [Metric("loss/G", 0.5, 1, s) for s in (60, 70)])
    assert tracking.deliver_spilled(uri, spill) == 0 and not spill.exists()
    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss/G")) == [60, 70]


def test_wait_sent_returns_once_delivered_and_close_ends_the_sender_thread(tmp_path: Path):
    """What a Tune trial relies on: a report is in MLflow before Tune sees it, and a reused trial
    process does not keep one sender thread per finished trial."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_or_resume_run(uri, "buf", "key", "r")[0]
    buf = tracking.MetricBuffer(uri, run_id, tmp_path / "spill.jsonl", timeout=60)
    buf.add(7, {"w1": 0.25})
    buf.flush()
    assert buf.wait_sent(30.0)
    assert [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "w1")] == [(7, 0.25)]
    thread = buf._thread
    assert thread is not None and thread.is_alive()
    buf.close()
    assert not thread.is_alive() and buf.delivered == 1


def test_wait_sent_does_not_wait_on_a_server_known_to_be_away(tmp_path: Path):
    buf = tracking.MetricBuffer(
        f"http://127.0.0.1:{closed_port()}", "run-1", tmp_path / "s.jsonl", timeout=1.0, log=lambda m, **_: None
    )
    buf.add(1, {"w1": 1.0})
    buf.flush()
    t0 = time.perf_counter()
    assert not buf.wait_sent(5.0)  # the first refusal marks the server away and ends the wait
    assert time.perf_counter() - t0 < 3.0
    t0 = time.perf_counter()
    buf.add(2, {"w1": 2.0})
    buf.flush()
    assert not buf.wait_sent(5.0)
    assert time.perf_counter() - t0 < 1.0
    buf.close()  # waits its timeout, then keeps both steps in the spill file
    assert sorted(json.loads(line)["step"] for line in (tmp_path / "s.jsonl").read_text().splitlines()) == [1, 2]


def test_a_spill_file_cut_short_is_named_and_its_readable_lines_still_go(tmp_path: Path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_or_resume_run(uri, "spill", "key", "r")[0]
    spill = tmp_path / "run.jsonl"
    tracking.write_spill(spill, run_id, [Metric("loss/D", 0.5, 1, s) for s in (10, 20, 30)])
    with open(spill, "a") as fh:
        fh.write('{"run_id": "x", "key": "loss/D", "val\n')  # a crash mid-line
        fh.write("not json at all\n")
    said: list[str] = []
    assert tracking.deliver_spilled(uri, spill, log=said.append) == 0
    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss/D")) == [10, 20, 30]
    assert len(said) == 1 and str(spill) in said[0] and "2 line(s) unreadable (first: line 4)" in said[0]
    corrupt = spill.with_name("run.jsonl.corrupt")
    assert corrupt.read_text().splitlines()[1] == "not json at all" and not spill.exists()


def test_a_spill_that_cannot_be_written_is_said_once_and_the_sender_goes_on(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    lines: list[str] = []
    spill = blocker / "unsent.jsonl"  # under a file: cannot be created
    buf = tracking.MetricBuffer(
        f"http://127.0.0.1:{closed_port()}", "run-1", spill, timeout=0.5, log=lambda m, **_: lines.append(m)
    )
    for step in (1, 2):
        buf.add(step, {"loss/D": 1.0})
        buf.flush()
    buf.flush(wait=True)  # sets the batches aside: the write fails, and that is said
    buf.add(3, {"loss/D": 1.0})
    buf.flush(wait=True)
    buf.close()
    failed = [m for m in lines if f"writing {spill} failed" in m]
    assert len(failed) == 1 and buf.spill_failed and buf.spilled == 3
    assert not any("they are kept in" in m for m in lines)


class _Server:
    """A real HTTP endpoint on loopback that answers MLflow's log-batch with the given statuses in
    turn (then 200), and keeps the metric steps of every batch it accepted."""

    def __init__(self, statuses: list[int]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.statuses, self.accepted, self.paths = list(statuses), [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.paths.append(self.path)
                status = server.statuses.pop(0) if server.statuses else 200
                if status == 200:
                    server.accepted.append(sorted({m["step"] for m in body["metrics"]}))
                text = b"{}" if status == 200 else b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "no"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


def test_busy_server_gets_every_batch_in_order_once_it_answers_and_a_refusal_is_set_aside(tmp_path: Path):
    """HTTP 503 and 429 are "try again" (the same batch, in order); a 400 is a refusal no retry fixes:
    that batch is kept in the spill file, the next ones still go. One attempt per request: the
    buffer, not MLflow's client, decides when to try again."""
    server = _Server([503, 429, 503])
    lines: list[str] = []
    try:
        buf = tracking.MetricBuffer(
            server.uri, "run-1", tmp_path / "s.jsonl", timeout=30, log=lambda m, **_: lines.append(m)
        )
        for step in (1, 2, 3):
            buf.add(step, {"loss/D": float(step)})
            buf.flush()
        buf.flush(wait=True)
        assert server.accepted == [[1], [2], [3]] and buf.delivered == 3 and buf.spilled == 0
        assert len(server.paths) == 6 and set(server.paths) == {"/api/2.0/mlflow/runs/log-batch"}
        assert any("back after" in m for m in lines)

        server.statuses = [400]
        for step in (4, 5):
            buf.add(step, {"loss/D": float(step)})
            buf.flush()
        buf.close()
        assert server.accepted[-1] == [5] and buf.spilled == 1
        assert [json.loads(line)["step"] for line in (tmp_path / "s.jsonl").read_text().splitlines()] == [4]
        assert any("refused them (HTTP 400" in m for m in lines)
    finally:
        server.close()


def test_a_training_run_gets_system_metrics_and_keeps_the_status_the_block_earned(tmp_path: Path):
    import pytest
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.system_metrics.set_system_metrics_sampling_interval(1)
    try:
        ok = tracking.start_or_resume_run(uri, "sys", "ok", "grid-nonsaturating-mlp-0123abcd")[0]
        with tracking.system_metrics(uri, ok):
            time.sleep(2.5)
        failed = tracking.start_or_resume_run(uri, "sys", "failed", "r")[0]
        with pytest.raises(ZeroDivisionError), tracking.system_metrics(uri, failed):
            raise ZeroDivisionError("the training failed")
    finally:
        mlflow.system_metrics.set_system_metrics_sampling_interval(None)
    client = MlflowClient(uri)
    run = client.get_run(ok)
    assert run.info.status == "FINISHED" and run.info.run_name == "grid-nonsaturating-mlp-0123abcd"
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert client.get_run(failed).info.status == "FAILED" and mlflow.active_run() is None


def test_a_failed_rerun_of_a_finished_run_leaves_it_finished(tmp_path: Path):
    """A hand-back that fails (an unreadable checkpoint, say) must not mark the run whose training
    finished as FAILED; a run that had not finished is ended FAILED as before."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    for finished in (True, False):
        key = f"key-{finished}"
        run_id, resumed = tracking.start_or_resume_run(uri, "hand-back", key, "r")
        assert not resumed and tracking.find_run(uri, "hand-back", key).info.status == "RUNNING"
        if finished:
            tracking.end_run(uri, run_id, "FINISHED")
        before = tracking.find_run(uri, "hand-back", key)
        again, resumed = tracking.start_or_resume_run(uri, "hand-back", key, "r")
        assert again == run_id and resumed and client.get_run(run_id).info.status == "RUNNING"
        try:
            with tracking.closing_run(uri, run_id, before.info.status == "FINISHED"):
                raise ValueError("the checkpoint .../state.pt: cannot be read")
        except ValueError:
            pass
        assert client.get_run(run_id).info.status == ("FINISHED" if finished else "FAILED")
