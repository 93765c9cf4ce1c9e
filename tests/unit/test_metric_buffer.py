"""tracking.MetricBuffer without a server to talk to, and with a local store: no mocks."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from pipeline import tracking


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
