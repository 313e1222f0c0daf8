"""Full and unwritable disks, produced for real (no root needed): a checkpoint copy into the artifact
store that stops part-way through the file, a store database that then cannot be written either, and a
working folder where the demo data cannot be written. Each ends in one paragraph naming the path and
the operating system's cause, leaves nothing half-written in the store, and leaves earlier runs
readable. How the disk "fills up" is tests/disk_full.py."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import aaclip, child_env, one_paragraph, set_flags
from mlflow import MlflowClient

from aaclip_core.files import sha256_of
from aaclip_core.record import Artifact

pytestmark = pytest.mark.integration

DISK_FULL = Path(__file__).with_name("disk_full.py")
# The checkpoint's copy stops after this many bytes: its adapters and text optimiser state are larger.
LIMIT = 64 * 1024
# One class, a few images, one epoch per stage: the faults are in the copies, not in the training.
TINY = ["--set", "stage1.epochs=1", "--set", "stage2.epochs=1", "--set", 'data.train.classes=["fabric"]',
        "--set", "data.train.shot=4"]


def _train_on_full_disk(tmp_path: Path, uri: str, overrides: list[str], frees: bool, disk: Path | None = None,
                        **env: str) -> subprocess.CompletedProcess:
    """`aaclip train base` whose disk (the artifact store's, or ``disk``) fills up when the first
    checkpoint is written there."""
    disk = disk or tmp_path / "mlruns"
    cmd = [sys.executable, str(DISK_FULL), str(LIMIT), str(disk), "/checkpoints/", "1" if frees else "0",
           "--", "train", "base", "--recipe", "demo", "--tracking-uri", uri, *set_flags(overrides), *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=child_env(**env), cwd=tmp_path)


def _leftovers(root: Path) -> list[str]:
    """Temporary files or folders of a copy (hidden names) anywhere in the artifact store."""
    return [str(p) for p in root.rglob(".*")]


def _newest_run(client: MlflowClient, other_than: set[str]):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [run] = [r for r in runs if r.info.run_id not in other_than]
    return run


def test_a_disk_that_fills_during_a_checkpoint_copy(tmp_path, demo_overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    earlier = aaclip("train", "base", "--recipe", "demo", "--tracking-uri", uri, *set_flags(demo_overrides), *TINY,
                     cwd=tmp_path, timeout=1200)
    assert earlier.returncode == 0, earlier.stderr
    earlier_id = earlier.stdout.strip()
    store = tmp_path / "mlruns"
    [earlier_dir] = list(store.glob(f"*/{earlier_id}/artifacts"))
    before = {str(p.relative_to(earlier_dir)): sha256_of(p) for p in earlier_dir.rglob("*") if p.is_file()}
    assert any(p.endswith("adapters.safetensors") for p in before)
    client = MlflowClient(uri)

    # 1. The copy stops part-way; removing the partial copy frees the space, so the run is recorded FAILED.
    failed = _train_on_full_disk(tmp_path, uri, demo_overrides, frees=True)
    assert failed.returncode == 2, failed.stderr
    assert one_paragraph(failed.stderr), failed.stderr
    assert "File too large (EFBIG)" in failed.stderr and "Nothing half-written" in failed.stderr
    assert "checkpoints/stage1" in failed.stderr  # the path in the store
    assert "while copying adapters.safetensors" in failed.stderr or "while copying optimizer" in failed.stderr
    run = _newest_run(client, {earlier_id})
    assert run.info.status == "FAILED"
    run_dir = next(store.glob(f"*/{run.info.run_id}/artifacts"))
    assert (run_dir / Artifact.RECIPE).is_file()  # what was logged before the disk filled stays
    assert not (run_dir / "checkpoints" / "stage1").exists()  # the checkpoint: whole or not at all
    assert _leftovers(store) == []

    # 2. The disk stays full: the store cannot record FAILED either. The paragraph says so and how to end it.
    stuck = _train_on_full_disk(tmp_path, uri, demo_overrides, frees=False)
    assert stuck.returncode == 2, stuck.stderr
    assert one_paragraph(stuck.stderr), stuck.stderr
    stuck_run = _newest_run(client, {earlier_id, run.info.run_id})
    stuck_id = stuck_run.info.run_id
    assert "File too large (EFBIG)" in stuck.stderr
    assert f"Run {stuck_id} could not be marked FAILED either" in stuck.stderr
    assert f"`aaclip runs --mark-dead {stuck_id}`" in stuck.stderr
    assert stuck_run.info.status == "RUNNING"
    assert not next(store.glob(f"*/{stuck_id}/artifacts")).joinpath("checkpoints", "stage1").exists()
    assert _leftovers(store) == []

    # The store is whole (SQLite rolled the failed write back) and the advice works once the disk has room.
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    marked = aaclip("runs", "--mark-dead", stuck_id, "--tracking-uri", uri, cwd=tmp_path)
    assert marked.returncode == 0, marked.stderr
    assert client.get_run(stuck_id).info.status == "KILLED"

    # Earlier runs are as they were, and readable.
    listed = aaclip("runs", "--json", "--tracking-uri", uri, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    statuses = {row["run_id"]: row["status"] for row in json.loads(listed.stdout)}
    assert statuses == {earlier_id: "FINISHED", run.info.run_id: "FAILED", stuck_id: "KILLED"}
    after = {str(p.relative_to(earlier_dir)): sha256_of(p) for p in earlier_dir.rglob("*") if p.is_file()}
    assert after == before
    exported = aaclip("export", "--run", earlier_id, str(tmp_path / "model"), "--format", "aaclip",
                      "--tracking-uri", uri, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "model" / "adapters.safetensors").is_file()


def _unwritable_folder(tmp_path: Path) -> Path:
    """A working folder this process cannot create anything in. chmod 0555 stops an ordinary user but
    not root, which CI is not but a container may be: there, /sys (sysfs, where no process may create a
    folder) is used. The folder is checked to refuse a new folder either way."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    else:
        folder = Path("/sys")
    with pytest.raises(OSError):
        (folder / "aaclip-probe").mkdir()
    return folder


def test_demo_data_in_a_read_only_working_folder_is_one_paragraph(tmp_path):
    folder = _unwritable_folder(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store is elsewhere: only the demo data cannot be written
    try:
        out = aaclip("train", "base", "--recipe", "demo", "--tracking-uri", uri, *TINY, cwd=folder,
                     env=child_env(TMPDIR=str(tmp_path)))
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert one_paragraph(out.stderr), out.stderr
    assert f"Cannot generate the demo data in {folder / 'aaclip-demo-data' / 'train'}" in out.stderr
    assert "(EACCES)" in out.stderr or "(EPERM)" in out.stderr
    assert not (folder / "aaclip-demo-data").exists()


def test_a_full_temporary_folder_while_a_checkpoint_is_first_written_locally(tmp_path, demo_overrides):
    """A job writes each checkpoint in its work folder (in TMPDIR) before logging it: that disk fills."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = _train_on_full_disk(tmp_path, uri, demo_overrides, frees=True, disk=scratch, TMPDIR=str(scratch))
    assert out.returncode == 2, out.stderr
    assert one_paragraph(out.stderr), out.stderr
    assert "Cannot write the checkpoint" in out.stderr and "File too large (EFBIG)" in out.stderr
    assert "/checkpoints/stage1" in out.stderr and "TMPDIR" in out.stderr
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert not list(Path(run.info.artifact_uri.removeprefix("file://")).glob("checkpoints/*"))
    assert list(scratch.iterdir()) == []  # the work folder, half-written checkpoint and all, is gone


def test_a_run_stopped_while_the_disk_is_full_says_it_could_not_be_marked_killed(tmp_path, demo_overrides):
    """SIGTERM the moment the store's disk fills: ending the run KILLED fails too. The interrupt's
    paragraph says the run still shows RUNNING and how to end it; the advice works once there is room."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _train_on_full_disk(tmp_path, uri, demo_overrides, frees=False, DISK_FULL_SIGNAL="SIGTERM")
    assert out.returncode == 143, out.stderr
    assert one_paragraph(out.stderr), out.stderr
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "RUNNING"
    assert "interrupted (SIGTERM)" in out.stderr
    assert f"run {run.info.run_id} could not be marked KILLED" in out.stderr
    assert f"`aaclip runs --mark-dead {run.info.run_id}`" in out.stderr
    assert _leftovers(tmp_path / "mlruns") == []
    marked = aaclip("runs", "--mark-dead", run.info.run_id, "--tracking-uri", uri, cwd=tmp_path)
    assert marked.returncode == 0, marked.stderr
    assert client.get_run(run.info.run_id).info.status == "KILLED"
