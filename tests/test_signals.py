"""Signals handled at safe points, with real processes: a SIGTERM, SIGHUP or Ctrl-C that arrives
inside a store write is held until the write ends (``signals.shielded``), so the run still ends
KILLED and the store is never left locked; and a real job signalled at many moments ends cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from clirun import as_at_a_terminal, child_env, start_aaclip
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
    done = subprocess.run([sys.executable, "-c", HOLD, name], capture_output=True, text=True, timeout=60,
                          preexec_fn=as_at_a_terminal)
    lines = done.stdout.splitlines()
    assert lines[0] == "finished the shielded block", done.stdout + done.stderr
    assert lines[1].startswith("raised after the block:") and lines[1].endswith(str(code)), lines
    assert "not reached" not in done.stdout


def test_an_error_inside_a_shielded_block_gives_way_to_the_signal():
    script = HOLD.replace('print("finished the shielded block", flush=True)', 'raise ValueError("boom")')
    done = subprocess.run([sys.executable, "-c", script, "SIGTERM"], capture_output=True, text=True, timeout=60)
    assert "raised after the block: Terminated 143" in done.stdout, done.stdout + done.stderr


AT_EXIT = """
import os, signal, sys, time, weakref
from aaclip_core import signals
signals.install()
class Held: pass
held = Held()
# Python's clean-up at exit runs this finalizer (tempfile's folders are removed the same way); the
# signal lands inside it.
weakref.finalize(held, lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
if sys.argv[1] == "stand_down":
    signals.stand_down()
print("command ended", flush=True)
"""


@pytest.mark.parametrize("ending", ["stand_down", "still_handling"])
def test_a_signal_after_the_command_ended_prints_no_traceback_at_exit(ending):
    done = subprocess.run([sys.executable, "-c", AT_EXIT, ending], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "command ended"
    if ending == "stand_down":  # what aaclip_cli.main does once the command has returned
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    else:  # the fault stand_down removes: the interrupt raised inside the finalizer, its traceback shown
        assert "Traceback" in done.stderr and "received SIGTERM" in done.stderr, done.stderr


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


# Where in a real `train base` on the demo it is stopped, each moment held to the job's own progress:
# "so far into the gap after the stderr line that starts with ...", the gap measured in an uninterrupted
# run and scaled by how much slower or faster the signalled job reached that line. Fixed seconds fell
# past the job's end (or into its imports) on a loaded machine. None: 1 s after the start, importing.
MOMENTS = (
    (None, 0.0),                   # importing: no handlers yet, or no run opened
    ("· train data", 0.0),         # building the model, opening the store and the run
    ("· building", 0.3),           # stage 1, its loader workers
    ("stage1 epoch 1/1", 0.0),     # stage 1's checkpoint written and copied into the store
    ("stage2 epoch 1/3", 0.0),     # the epoch's metrics written to the store
    ("stage2 epoch 1/3", 0.5),     # stage 2, data loading
    ("stage2 epoch 2/3", 0.3),
    ("stage2 epoch 3/3", 0.0),     # the last checkpoint, the test metrics, ending the run
    ("done", 0.0),                 # the run ending: often finished first
)
# The moments from "· train data" to "stage2 epoch 3/3" fall inside the run; most must stop it.
KILLED_AT_LEAST = 5


class _Lines:
    """A child's stderr lines as they come, each with when it came (a reader thread)."""

    def __init__(self, proc: subprocess.Popen, began: float) -> None:
        self.seen: list[tuple[float, str]] = []
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc, began), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen, began: float) -> None:
        for line in proc.stderr:
            with self._cond:
                self.seen.append((time.monotonic() - began, line))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> float | None:
        """When the ``count``-th line came (seconds from the start), or None if the stream ended first."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.seen) >= count or self._closed, timeout)
            return self.seen[count - 1][0] if len(self.seen) >= count else None

    def text(self) -> str:
        self._thread.join(timeout=60)
        return "".join(line for _, line in self.seen)


def _anchor(lines: list[tuple[float, str]], prefix: str) -> int:
    """The number (1-based) of the first line starting with ``prefix``."""
    found = [i + 1 for i, (_, line) in enumerate(lines) if line.startswith(prefix)]
    assert found, (prefix, [line for _, line in lines])  # the job's progress lines changed: update MOMENTS
    return found[0]


@pytest.mark.integration  # ten real jobs: CI's second step
def test_a_job_stopped_at_many_moments_ends_killed_with_no_traceback(tmp_path, demo_overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "base", "--recipe", "demo", "--tracking-uri", uri,
            *[a for override in demo_overrides for a in ("--set", override)],
            "--set", "stage1.epochs=1", "--set", "stage2.epochs=3", "--set", 'data.train.classes=["fabric"]']
    began = time.monotonic()
    whole = start_aaclip(*args, env=child_env(), cwd=tmp_path)
    reference = _Lines(whole, began)
    whole.wait(timeout=600)
    duration = time.monotonic() - began
    assert whole.returncode == 0, reference.text()[-3000:]
    reference.text()
    outcomes = []
    seen = reference.seen
    for i, (prefix, share) in enumerate(MOMENTS):
        sig = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)[i % 3]
        k = _anchor(seen, prefix) if prefix else 0
        then = seen[k - 1][0] if k else 0.0
        gap = ((seen[k][0] if k < len(seen) else duration) - then) * share if k else 1.0
        # Every other job loads its data in a worker process, which the signal reaches too when a
        # cluster signals the whole process group.
        workers = ["--set", "data.num_workers=1"] if i % 2 else []
        started = time.monotonic()
        proc = start_aaclip(*args, *workers, env=child_env(), cwd=tmp_path, start_new_session=True)
        lines = _Lines(proc, started)
        came = lines.wait_for(k, timeout=600) if k else 0.0
        if came is not None:  # else the job ended (or failed) before that line: not interrupted
            pace = came / then if k and then > 0 else 1.0
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=gap * pace)
            if proc.poll() is None:
                os.killpg(proc.pid, sig)  # the job and its loader workers, as SLURM and `timeout` do
        proc.wait(timeout=600)
        proc.stdout.read()
        stderr = lines.text()
        outcomes.append((f"{prefix or 'start'} + {share:.0%}", sig.name, proc.returncode))
        # 0: it ended first; 128 + sig: aaclip stopped it; -sig: it died of the signal while Python was
        # still importing, before aaclip's handlers existed (no run open yet: the store check below).
        assert proc.returncode in (0, 128 + sig, -sig), (outcomes[-1], stderr[-3000:])
        assert "Traceback" not in stderr, (outcomes[-1], stderr[-3000:])
    # Every run the jobs opened has ended (none left RUNNING) and the store still answers.
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], outcomes
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert len(killed) >= KILLED_AT_LEAST, (outcomes, [r.info.status for r in runs])
