"""The heartbeat thread of a running run: its tag advances while the run is open and stops when it ends
(`aaclip runs` and `--resume` tell a live run from a dead one by it)."""

from __future__ import annotations

import threading
import time

from mlflow import MlflowClient

from aaclip_core.registry import tracking
from aaclip_core.registry.tracking import HEARTBEAT_TAG, connect, tracked_run


def _beat(client: MlflowClient, run_id: str) -> int:
    return int(client.get_run(run_id).data.tags[HEARTBEAT_TAG])


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aaclip-heartbeat"]


def test_the_heartbeat_advances_while_a_run_is_open_and_stops_when_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "HEARTBEAT_SECONDS", 0.2)  # 30 s in use; the tag holds whole seconds
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = connect(uri, write=True)
    client = MlflowClient(uri)
    assert _heartbeat_threads() == []
    with tracked_run(mlflow, "heartbeat", "beating", {"aaclip.stage": "base"}) as run:
        run_id = run.info.run_id
        first = _beat(client, run_id)
        assert len(_heartbeat_threads()) == 1
        deadline = time.monotonic() + 10
        while _beat(client, run_id) <= first:  # a whole second later, written by the thread alone
            assert time.monotonic() < deadline, "the heartbeat tag did not advance"
            time.sleep(0.1)
        assert _beat(client, run_id) >= first + 1
    assert _heartbeat_threads() == []
    last = _beat(client, run_id)
    time.sleep(1.5)  # several intervals, and more than a whole second
    assert _beat(client, run_id) == last
    assert client.get_run(run_id).info.status == "FINISHED"
