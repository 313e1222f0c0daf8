"""Resume with real processes: a feedback job killed right after a mid-loop checkpoint (loop 1's stage 1,
before its stage 2) is refused while its process lives, taken over once it is dead, and finishes with
the weights and held-out metrics of a job that was never interrupted; the same through a real
`mlflow server`.

Tolerance: 1e-6 absolute on every adapter weight and held-out metric. The checkpoint restores the
weights, both AdamW states (moments and step counts) and the torch and loader random states exactly,
so the resumed job repeats the same arithmetic; what 1e-6 leaves room for is a multi-threaded CPU kernel
summing in another order. The test prints the largest difference it saw (`pytest -rP`): 0 on the 2-core
machine it was written on (bitwise equal).
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from clirun import aaclip, one_paragraph, set_flags, start_aaclip
from mlflow import MlflowClient

from aaclip_core.checkpoints.checkpoint import checkpoint_name
from aaclip_core.registry.runs import run_liveness

pytestmark = pytest.mark.integration

# One loop keeps CI's second step short: its mid-loop checkpoint (after stage 1) is where the job is
# killed, and stage 2 after the resume must repeat the uninterrupted job's (the loop boundary is
# test_feedback's in-process resume).
FAST = [
    "feedback.loops=1",
    "feedback.text_epochs_per_loop=1",
    "feedback.image_epochs_per_loop=1",
    "feedback.warmup_epochs=1",
    "data.train.shot=8",
    "feedback.val_fraction=0.25",
    "eval.aupro=false",
]
MID_LOOP, FINAL = checkpoint_name(1, 1), checkpoint_name(1, 2)
ATOL = 1e-6


def _job(demo_overrides: list[str], uri: str, *extra: str) -> list[str]:
    return ["train", "feedback", "--recipe", "feedback-demo", "--tracking-uri", uri, "--json",
            *set_flags(demo_overrides + FAST + list(extra))]


def _final(uri: str, run_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    from aaclip_core.jobs import common
    from aaclip_core.registry.tracking import connect

    return common.run_checkpoint(connect(uri), run_id, FINAL, tmp_path / "final").adapters


def _wait_for(predicate, proc, timeout: float, step: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {MID_LOOP} was logged: {proc.communicate()}")
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {MID_LOOP}")


def _assert_same_training(resumed: dict, straight: dict, uri: str, tmp_path: Path) -> None:
    assert resumed["resumed_from"] == MID_LOOP
    assert resumed["selected_loop"] == straight["result"]["selected_loop"]
    for loop, value in straight["result"]["val_per_loop"].items():
        assert abs(resumed["val_per_loop"][loop] - value) <= ATOL, (loop, resumed["val_per_loop"], value)
    a, b = straight["adapters"], _final(uri, resumed["run_id"], tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=f"{k} differs after resume")
    largest = max(float((b[k].double() - a[k].double()).abs().max()) for k in a)
    print(f"resumed from {MID_LOOP}: largest weight difference {largest:.3g} over {len(a)} tensors")  # -rP shows it


@pytest.fixture(scope="module")
def straight(demo_overrides, tmp_path_factory):
    """The job, never interrupted."""
    work = tmp_path_factory.mktemp("straight")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    out = aaclip(*_job(demo_overrides, uri), cwd=work, timeout=1200)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    adapters = _final(uri, result["run_id"], work)
    # Training moved the weights between the mid-loop checkpoint and the end: the comparison is not vacuous.
    from aaclip_core.jobs import common
    from aaclip_core.registry.tracking import connect

    mid = common.run_checkpoint(connect(uri), result["run_id"], MID_LOOP, work / "mid").adapters
    assert any(not torch.equal(mid[k], adapters[k]) for k in adapters)
    return {"result": result, "adapters": adapters}


def test_a_live_run_is_refused_and_a_killed_one_resumes_from_mid_loop(straight, demo_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = start_aaclip(*_job(demo_overrides, uri), cwd=tmp_path)
    try:
        # The checkpoint folder appears whole (renamed into place), so its adapters mean it is complete.
        ckpt = _wait_for(lambda: next(tmp_path.glob(f"mlruns/*/*/artifacts/checkpoints/{MID_LOOP}/adapters.safetensors"),
                                      None), proc, 900, 0.05)
        os.kill(proc.pid, signal.SIGSTOP)  # hold it before its next checkpoint: alive, its heartbeat fresh
        run_id = ckpt.parents[3].name
        client = MlflowClient(uri)
        assert run_liveness(client.get_run(run_id)) == "live"

        refused = aaclip("train", "feedback", "--resume", run_id[:8], "--tracking-uri", uri, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert one_paragraph(refused.stderr) and "still running" in refused.stderr and str(proc.pid) in refused.stderr
        assert proc.poll() is None and client.get_run(run_id).info.status == "RUNNING"
    finally:
        proc.kill()  # SIGKILL: nothing in the process ends its run
        proc.wait(timeout=60)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert run_liveness(client.get_run(run_id)) == "stale"
    assert [a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "checkpoints")] == [MID_LOOP]

    out = aaclip("train", "feedback", "--resume", run_id[:8], "--tracking-uri", uri, "--json", cwd=tmp_path,
                 timeout=1200)
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)
    assert resumed["run_id"] == run_id
    _assert_same_training(resumed, straight, uri, tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    assert [c.data.tags["aaclip.loop"] for c in children] == ["1"]  # loop 1's run taken over, not doubled
    assert {c.info.status for c in children} == {"FINISHED"}


def test_a_killed_job_resumes_through_the_tracking_server(straight, demo_overrides, mlflow_server, tmp_path):
    uri = mlflow_server["url"]
    experiment = f"resume-{uuid.uuid4().hex[:8]}"  # the server is shared by the session's tests
    proc = start_aaclip(*_job(demo_overrides, uri, f'tracking.experiment="{experiment}"'), cwd=tmp_path)
    client = MlflowClient(uri)

    def mid_loop_logged():
        exp = client.get_experiment_by_name(experiment)
        for run in client.search_runs([exp.experiment_id], "tags.`aaclip.stage` = 'feedback'") if exp else []:
            if any(a.path.endswith(MID_LOOP) for a in client.list_artifacts(run.info.run_id, "checkpoints")):
                return run.info.run_id
        return None

    try:
        run_id = _wait_for(mid_loop_logged, proc, 900, 0.1)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

    out = aaclip("train", "feedback", "--resume", run_id, "--tracking-uri", uri, "--json", cwd=tmp_path, timeout=1200)
    assert out.returncode == 0, out.stderr
    _assert_same_training(json.loads(out.stdout), straight, uri, tmp_path)
    assert client.get_run(run_id).info.status == "FINISHED"
