"""Signals handled at safe points, with real processes: a SIGTERM, SIGHUP or Ctrl-C that arrives
inside a store write is held until the write ends (``signals.shielded``), so the run still ends
KILLED and the store is never left locked; and a real job signalled at many moments ends cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from clirun import child_env, start_aaclip
from mlflow import MlflowClient

HOLD = """
import os, signal, sys, time
from aaclip_core import signals
signals.install()
sig = getattr(signal, sys.argv[1])
try:
    with signals.shielded():
        os.kill(os.getpid(), sig)
        time.sleep(0.2)
        print("finished the shielded block", flush=True)
    print("not reached")
except KeyboardInterrupt as exc:
    print("raised after the block:", type(exc).__name__, signals.exit_code(exc), flush=True)
"""


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_inside_a_shielded_block_is_raised_when_the_block_ends(name, code):
    done = subprocess.run([sys.executable, "-c", HOLD, name], capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert lines[0] == "finished the shielded block", done.stdout + done.stderr
    assert lines[1].startswith("raised after the block:") and lines[1].endswith(str(code)), lines
    assert "not reached" not in done.stdout


def test_an_error_inside_a_shielded_block_gives_way_to_the_signal():
    script = HOLD.replace('print("finished the shielded block", flush=True)', 'raise ValueError("boom")')
    done = subprocess.run([sys.executable, "-c", script, "SIGTERM"], capture_output=True, text=True, timeout=60)
    assert "raised after the block: Terminated 143" in done.stdout, done.stdout + done.stderr


def test_store_writes_are_shielded(tmp_path):
    """Every write of the store client the jobs get holds signals; reads pass through as they are."""
    script = f"""
import os, signal
from aaclip_core import signals
from aaclip_core.registry.tracking import connect
signals.install()
mlflow = connect("sqlite:///{tmp_path / 'mlflow.db'}", write=True)
mlflow.set_experiment("e")
run = mlflow.start_run()
client = mlflow.MlflowClient()
real_set_tag = client._target.set_tag
def set_tag_then_signal(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
    return real_set_tag(*args)
client._target.set_tag = set_tag_then_signal
try:
    client.set_tag(run.info.run_id, "written", "yes")
except KeyboardInterrupt:
    mlflow.end_run(status="KILLED")
    print("interrupted after the write", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "interrupted after the write" in done.stdout, done.stdout + done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.data.tags["written"] == "yes" and run.info.status == "KILLED"


# Where in a real `train base` on the demo it is stopped, as fractions of an uninterrupted run's time:
# importing, opening the store, stage 1, checkpoint copies, stage 2 with its per-epoch metric writes,
# ending the run.
FRACTIONS = (0.15, 0.3, 0.42, 0.54, 0.66, 0.78, 0.88, 0.96)


@pytest.mark.integration  # nine real jobs: CI's second step
def test_a_job_stopped_at_many_moments_ends_killed_with_no_traceback(tmp_path, demo_overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "base", "--recipe", "demo", "--tracking-uri", uri,
            *[a for override in demo_overrides for a in ("--set", override)],
            "--set", "stage1.epochs=1", "--set", "stage2.epochs=3"]
    began = time.monotonic()
    whole = start_aaclip(*args, env=child_env(), cwd=tmp_path)
    _, stderr = whole.communicate(timeout=600)
    assert whole.returncode == 0, stderr[-3000:]
    duration = time.monotonic() - began
    outcomes = []
    for i, fraction in enumerate(FRACTIONS):
        sig = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)[i % 3]
        # Every other job loads its data in a worker process, which the signal reaches too when a
        # cluster signals the whole process group.
        workers = ["--set", "data.num_workers=1"] if i % 2 else []
        proc = start_aaclip(*args, *workers, env=child_env(), cwd=tmp_path, start_new_session=True)
        try:
            proc.wait(timeout=fraction * duration)  # a job that ends first is simply not interrupted
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, sig)  # the job and its loader workers, as SLURM and `timeout` do
        _, stderr = proc.communicate(timeout=600)
        outcomes.append((round(fraction * duration, 1), sig.name, proc.returncode))
        # 0: it ended first; 128 + sig: aaclip stopped it; -sig: it died of the signal while Python was
        # still importing, before aaclip's handlers existed (no run open yet: the store check below).
        assert proc.returncode in (0, 128 + sig, -sig), (outcomes[-1], stderr[-3000:])
        assert "Traceback" not in stderr, (outcomes[-1], stderr[-3000:])
    # Every run the jobs opened has ended (none left RUNNING) and the store still answers.
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], outcomes
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) >= 3, (outcomes, [r.info.status for r in runs])
