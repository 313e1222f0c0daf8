"""A failure keeps its cause: a download that cannot write is not a "missing artifact", an unknown
run is "No run" only when MLflow says it does not exist, a bug inside a store call keeps its type,
and the CLI says an unexpected error is a bug (one paragraph, exit 1) instead of renaming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from clirun import CLI, child_env, one_paragraph

from aaclip_core.errors import LocalFileError, StoreError, TrackingError
from aaclip_core.registry.failures import classify_store_failure, store_call
from aaclip_core.registry.tracking import connect, download, get_run, tracked_run


@pytest.fixture
def logged_run(tracking_uri):
    """A real SQLite store with one finished run that logged results/report.json."""
    mlflow = connect(tracking_uri, write=True)
    with tracked_run(mlflow, "failure-causes", "holder", {"aaclip.stage": "test"}) as run:
        mlflow.log_text('{"ok": true}', "results/report.json")
    return mlflow, run.info.run_id


def test_download_into_a_path_through_a_file_names_the_os_cause(logged_run, tmp_path):
    mlflow, run_id = logged_run
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where a folder should be")
    dst = blocker / "downloads"
    with pytest.raises(LocalFileError) as caught:
        download(mlflow, run_id, "results/report.json", dst)
    message = str(caught.value)
    assert "has no artifact" not in message and "trained to the end" not in message
    assert str(dst) in message and "Not a directory (ENOTDIR)" in message
    assert "\n" not in message


def test_download_into_an_unwritable_folder_names_the_os_cause(logged_run, tmp_path):
    """Where permissions hold (not root), a read-only destination folder; as root, whose writes no
    mode refuses, a destination whose name is taken by a regular file (EEXIST)."""
    mlflow, run_id = logged_run
    if os.geteuid() != 0:
        dst = tmp_path / "read-only"
        dst.mkdir()
        dst.chmod(0o555)
        cause = "Permission denied (EACCES)"
    else:
        dst = tmp_path / "taken"
        dst.write_text("x")
        cause = "File exists (EEXIST)"
    try:
        with pytest.raises(LocalFileError) as caught:
            download(mlflow, run_id, "results/report.json", dst)
    finally:
        dst.chmod(0o755)
    assert "has no artifact" not in str(caught.value) and cause in str(caught.value)
    assert str(dst) in str(caught.value)


def test_a_missing_artifact_is_still_missing(logged_run, tmp_path):
    mlflow, run_id = logged_run
    for path in ("results/nothing.json", "checkpoints/final"):
        with pytest.raises(TrackingError, match=f"has no artifact '{path}'") as caught:
            download(mlflow, run_id, path, tmp_path / "dst")
        assert not isinstance(caught.value, StoreError)
    # the artifact that exists downloads
    assert download(mlflow, run_id, "results/report.json", tmp_path / "dst").read_text() == '{"ok": true}'


def test_get_run_of_an_unknown_full_id_is_no_run(logged_run):
    mlflow, run_id = logged_run
    unknown = "0" * 32
    with pytest.raises(TrackingError, match=f"No run '{unknown}'"):
        get_run(mlflow, unknown)
    assert get_run(mlflow, run_id).info.run_id == run_id


def test_a_bug_inside_store_call_keeps_its_type(logged_run):
    mlflow, _ = logged_run
    with pytest.raises(TypeError, match="unsupported operand"):
        with store_call(mlflow, "listing experiments"):
            mlflow.MlflowClient().search_experiments()
            None + 1  # noqa: B018 - aaclip's own code failing inside the block


def test_a_store_failure_inside_store_call_is_still_a_store_error(logged_run, tmp_path):
    """A real SQLite driver failure (a database in a folder that does not exist) is named as the store's."""
    import sqlite3

    mlflow, _ = logged_run
    with pytest.raises(StoreError, match="cannot be opened.*while listing experiments"):
        with store_call(mlflow, "listing experiments"):
            sqlite3.connect(str(tmp_path / "gone" / "mlflow.db")).execute("select 1")
    assert classify_store_failure(TypeError("x")) is None


def test_only_the_stores_failures_are_classified():
    """MLflow's own error objects: a server's 5xx answer and a driver's error are the store's; an
    MLflow error of aaclip's making (a local download failing, a bad argument) and a bug are not."""
    import sqlite3

    from mlflow.exceptions import MlflowException, RestException

    assert "server error (HTTP 500" in classify_store_failure(
        RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}))
    assert "IntegrityError" in classify_store_failure(sqlite3.IntegrityError("UNIQUE constraint failed"))
    for exc in (MlflowException("Failed to download: [Errno 28] No space left on device"), TypeError("x"),
                RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"})):
        assert classify_store_failure(exc) is None, exc


# The real CLI in its own process, with `aaclip runs` failing inside aaclip's code as a bug would.
_BUGGY_CLI = """
import aaclip_core.registry.runs as runs
def list_runs(*args, **kwargs):
    return {}["no such key"]
runs.list_runs = list_runs
from aaclip_cli.main import main
main()
"""


def test_cli_says_an_unexpected_error_is_a_bug(tracking_uri):
    cmd = [sys.executable, "-c", _BUGGY_CLI, "runs", "--tracking-uri", tracking_uri]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(AACLIP_DEBUG="0"))
    assert out.returncode == 1, out.stderr
    assert one_paragraph(out.stderr), out.stderr
    assert out.stderr.startswith("error: KeyError: 'no such key'") and "bug in aaclip" in out.stderr
    assert "AACLIP_DEBUG=1" in out.stderr and "No run" not in out.stderr and out.stdout == ""
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(AACLIP_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "KeyError" in debug.stderr


def test_cli_user_errors_still_exit_2(tracking_uri):
    out = subprocess.run([*CLI, "doctor", "0" * 32, "--tracking-uri", tracking_uri], capture_output=True,
                         text=True, timeout=120, env=child_env())
    assert out.returncode == 2 and one_paragraph(out.stderr) and "No run" in out.stderr, out.stderr
