"""torchrun beyond `train base`: a `train feedback` job (official fidelity, the demo's default) with 2 Gloo
processes against a real `mlflow server`, stopped by a SIGTERM to the torchrun launcher as a scheduler
stops it. The run on the server ends KILLED (not FAILED: the launcher takes the rendezvous store down with
it, which is not a rank dying first), and no aaclip process prints a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import pytest
from test_distributed import BIN, _env, _free_port, _sets

# Real processes and a real server: CI's second step (`pytest -m integration`).
pytestmark = pytest.mark.integration


def _runs(uri: str) -> list:
    return mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()])


def test_sigterm_to_torchrun_ends_a_feedback_job_on_the_server_killed(tmp_path, demo_overrides, mlflow_server):
    uri = mlflow_server["url"]
    before = {r.info.run_id for r in _runs(uri)}
    sets = _sets([*demo_overrides, "data.train.shot=4", "feedback.loops=10", 'runtime.device="cpu"',
                  "runtime.threads=1"])
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), "--no-python", "--",
           str(BIN / "aaclip"), "train", "feedback", "--recipe", "feedback-demo", *sets, "--tracking-uri", uri,
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, run = time.monotonic() + 300, None
        while time.monotonic() < deadline and run is None:  # until the job's run logs a training metric
            time.sleep(1.0)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            new = [r for r in _runs(uri) if r.info.run_id not in before]
            if new and any(k.endswith("probe_loss") or k.endswith("/loss") for k in new[0].data.metrics):
                run = new[0]
        assert run is not None, "the torchrun job did not start training in time"
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    new = [r for r in _runs(uri) if r.info.run_id not in before]
    # One job, one run (its feedback loops are child runs of it), whatever the world size.
    top = [r for r in new if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1, [(r.info.run_id, r.data.tags.get("mlflow.parentRunId")) for r in new]
    stored = top[0]
    assert stored.info.status == "KILLED", (stored.info.status, stored.data.tags.get("aaclip.failure"), stderr[-3000:])
    children = [r for r in new if r is not stored]
    assert all(r.data.tags["mlflow.parentRunId"] == stored.info.run_id for r in children)
    assert [r.info.status for r in children if r.info.status == "RUNNING"] == [], stderr[-3000:]  # none left open
    assert stored.data.tags.get("aaclip.world_size") == "2" and stored.data.tags.get("aaclip.fidelity") == "official"
    # Each rank says in one line that it was stopped; the one traceback is the launcher's own (torchrun
    # raises SignalException in its agent when signalled: its behaviour, not aaclip's).
    assert "rank 0 received SIGTERM" in stderr and "rank 1 received SIGTERM" in stderr, stderr[-3000:]
    tracebacks = stderr.split("Traceback (most recent call last):")[1:]
    assert all(t.lstrip().startswith("File") and "/torchrun" in t.splitlines()[1] and "SignalException" in t
               for t in tracebacks), stderr[-3000:]
    assert len(tracebacks) <= 1, stderr[-3000:]
