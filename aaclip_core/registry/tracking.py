"""The run registry: every train and test is an MLflow run. The only module that imports MLflow.

Store: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > SQLite ``mlflow.db`` in the working directory
(MLflow's own default, with its default local artifact folder). A run that raises ends FAILED, one
interrupted (Ctrl-C, SIGTERM, SIGHUP) ends KILLED; never RUNNING. A running run carries its host, its
process id and a heartbeat, so a run whose process died can be told from one still training.

Every failure of the store itself (unreachable, read-only, locked, wrong schema version) goes through
``registry.failures``: one paragraph naming the URI and the cause, never the driver's traceback text.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aaclip_core import distributed, signals
from aaclip_core.errors import (
    AaclipError,
    JobFailed,
    LocalFileError,
    RankStopped,
    RunNotMarked,
    StoreError,
    TrackingError,
)
from aaclip_core.files import copy_file_atomic, copy_tree_atomic, os_cause
from aaclip_core.record import Tag
from aaclip_core.registry.failures import classify_store_failure, is_transient, store_call, store_failure

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The experiment tag the MLflow 3 UI reads to pick its page: model training, not the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
HOST_TAG, PID_TAG, HEARTBEAT_TAG = Tag.HOST, Tag.PID, Tag.HEARTBEAT
HEARTBEAT_SECONDS = 30.0
# A RUNNING run whose heartbeat is older than this is stale: ten missed beats, so a loaded machine or
# a slow store does not make a live run look dead.
STALE_AFTER_SECONDS = 10 * HEARTBEAT_SECONDS

# MLflow's own settings for HTTP stores. Its defaults (7 retries, 120 s timeout) make an unreachable
# server cost minutes; these make it fail in about 15 s. Applied only where the user set nothing.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# How often opening a store is retried when another process holds it (SQLite "database is locked").
_OPEN_ATTEMPTS = 5


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # MLflow's SQL store logs every database error with its traceback at ERROR, then raises it: the
    # raised error is what aaclip reports (one paragraph, e.g. a full disk), so the log line is dropped.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a tracking server MLflow writes "View run/experiment at: URL" lines to stdout when a
    # run ends, which would break `--json` and `RUN=$(aaclip train ...)`: stdout is the caller's.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def resolve_tracking_uri(cli_uri: str | None) -> str:
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# ------------------------------------------------------------------------------------------ opening


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    if raw.startswith("file:"):
        raw = raw[len("file:"):]
    return Path(raw) if raw and raw != ":memory:" else None


def _creation_lock(db: Path | None):
    """A file lock beside the SQLite file: MLflow creates and migrates a new store without one, and two
    processes doing it at once collide ("duplicate column name"). Where the lock file cannot be made
    (a read-only folder) nothing can be created either, so no lock is needed."""
    if db is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    lock = FileLock(str(db) + ".lock", timeout=120)
    try:
        lock.acquire()
    except OSError:
        return contextlib.nullcontext()
    return contextlib.closing(_Releaser(lock))


class _Releaser:
    def __init__(self, lock) -> None:
        self._lock = lock

    def close(self) -> None:
        self._lock.release()


def _check_writable(uri: str, db: Path | None) -> None:
    """A SQLite store this process cannot write fails now, before any work, not at the first write."""
    if db is None:
        return
    folder = db.parent if str(db.parent) else Path(".")
    if db.exists() and not os.access(db, os.W_OK) or not os.access(folder, os.W_OK | os.X_OK):
        what = f"the file {db}" if db.exists() and not os.access(db, os.W_OK) else f"the folder {folder}"
        raise StoreError(
            f"The MLflow store '{uri}' is read-only for this process ({what} is not writable), so no run can be "
            "recorded in it. Point --tracking-uri at a store you can write, e.g. sqlite:///mlflow.db in your own "
            "folder (commands that only read, such as `aaclip runs` and `aaclip compare`, work on it as it is)."
        )


# ------------------------------------------------------------------------------------------ artifacts


def _atomic_local_repository():
    """MLflow's local artifact repository (a ``file:`` or plain-path artifact root) with atomic
    writes, registered in place of MLflow's own for those schemes.

    MLflow copies a folder (``log_artifacts``: every checkpoint) file by file straight into the
    store with shutil, so a full disk leaves a half-written ``adapters.safetensors`` there (releases
    older than the 3.17 aaclip is tested with did the same for one file, ``log_artifact``). A failed copy cannot be made atomic from
    outside (MLflow's copy has already written the partial file when it raises), so the copy itself is
    ours, through the repository hook MLflow offers artifact stores (its registry, the same one its
    ``mlflow.artifact_repository`` plug-ins use): a new folder is filled beside its destination and
    renamed into place, a file is written beside its destination and renamed, and what a failed copy
    left is removed (``files.copy_tree_atomic``). The failure is one paragraph naming the file in the
    store and the operating system's cause. Reading, listing and downloading stay MLflow's. Stores
    behind an HTTP server upload instead, and the server writes them."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    class AtomicLocalArtifactRepository(LocalArtifactRepository):
        def log_artifact(self, local_file, artifact_path=None):
            dest = Path(self.artifact_dir, os.path.normpath(artifact_path or "."), Path(local_file).name)
            with _store_write(dest):
                self._get_or_create_artifact_dir(artifact_path)
                if not (dest.exists() and os.path.samefile(local_file, dest)):
                    copy_file_atomic(Path(local_file), dest)

        def log_artifacts(self, local_dir, artifact_path=None):
            if not artifact_path:
                folder = Path(self._get_or_create_artifact_dir(None))
            else:
                path = Path(os.path.normpath(artifact_path))
                parent = self._get_or_create_artifact_dir(None if str(path.parent) == "." else str(path.parent))
                folder = Path(parent) / path.name
            with _store_write(folder):
                copy_tree_atomic(Path(local_dir), folder)

    return AtomicLocalArtifactRepository


@contextlib.contextmanager
def _store_write(dest: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        # A failed copy names its source file (shutil: filename; the file it wrote, a hidden temporary one, is filename2).
        name = Path(os.fsdecode(exc.filename)).name if isinstance(exc.filename, (str, bytes, os.PathLike)) else ""
        copying = f" while copying {name}" if name and name != dest.name else ""
        raise LocalFileError(
            f"Cannot write {dest} into the run's artifact store: {os_cause(exc)}{copying}. Nothing half-written was "
            "left in the store. Free space there (or make it writable) and run again."
        ) from None


@functools.cache
def _register_atomic_artifacts() -> None:
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry as registry

    repository = _atomic_local_repository()
    for scheme in ("", "file"):
        registry.register(scheme, repository)


def connect(cli_uri: str | None, write: bool = False):
    """Point MLflow at the store, make sure it opens (creating/migrating a new SQLite store under a
    file lock, retrying while another process holds it) and return the module (imported lazily: it is
    slow to import). ``write``: the caller will record runs, so a read-only store is refused now."""
    import mlflow

    _quiet_mlflow()  # after the import: mlflow sets up its own loggers when imported
    _register_atomic_artifacts()
    uri = resolve_tracking_uri(cli_uri)
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir() and str(db.parent):
        raise StoreError(
            f"The MLflow store '{uri}' cannot be opened: the folder {db.parent} does not exist. Create it or fix "
            "--tracking-uri / MLFLOW_TRACKING_URI."
        )
    if write:
        _check_writable(uri, db)
    with _creation_lock(db):
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                mlflow.MlflowClient().search_experiments(max_results=1)
                break
            except Exception as exc:
                if attempt + 1 < _OPEN_ATTEMPTS and is_transient(exc):
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise store_failure(uri, exc, "opening it") from None
    # Exactly one run per job: under torchrun only rank 0 writes; the others may read (recipes,
    # checkpoints) but their writes go nowhere.
    return shielded_tracking(mlflow) if distributed.is_main() else read_only_tracking(mlflow)


# What writes to the store, as functions of the mlflow module and methods of MlflowClient.
_WRITES = frozenset({
    "set_experiment", "start_run", "end_run", "log_metric", "log_metrics", "log_param", "log_params", "set_tag",
    "set_tags", "log_artifact", "log_artifacts", "log_text", "log_dict", "log_figure", "log_image",
    "log_batch", "set_terminated", "delete_tag", "create_run", "create_experiment", "set_experiment_tag",
    "update_run",
})


class _Writes:
    """MLflow (the module, or a client it makes) with every write passed through ``on_write``: the
    one wrapper behind both views of the store below, so a write method named in _WRITES is
    treated alike by both."""

    def __init__(self, target, on_write) -> None:
        self._target, self._on_write = target, on_write

    def __getattr__(self, name: str):
        attr = getattr(self._target, name)
        if name in _WRITES:
            return self._on_write(attr)
        if name == "MlflowClient":
            return lambda *a, **k: _Writes(attr(*a, **k), self._on_write)
        return attr


def _shielded_call(fn):
    def call(*args, **kwargs):
        with signals.shielded():
            return fn(*args, **kwargs)

    return call


def _ignore(*args, **kwargs) -> None:
    return None


def shielded_tracking(mlflow) -> _Writes:
    """MLflow as rank 0 sees it: every write runs shielded from SIGTERM, SIGHUP and Ctrl-C
    (``signals.shielded``). An interrupt raised inside a write leaves SQLite's write lock held by an
    open transaction, and ending the run KILLED then fails with "database is locked"."""
    return _Writes(mlflow, _shielded_call)


def read_only_tracking(mlflow) -> _Writes:
    """MLflow as ranks other than 0 see it: reads pass through, writes do nothing."""
    return _Writes(mlflow, lambda fn: _ignore)


class _FollowerRun:
    """What `tracked_run` yields on ranks other than 0: the id of rank 0's run."""

    def __init__(self, run_id: str) -> None:
        self.info = type("RunInfo", (), {"run_id": run_id})()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def aaclip_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aaclip")
    except PackageNotFoundError:
        return "0+unknown"


def _tag_experiment_kind(mlflow, experiment) -> None:
    key, kind = EXPERIMENT_KIND
    if experiment.tags.get(key) is None:  # a kind the user chose in the UI is kept
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, kind)


@contextlib.contextmanager
def tracked_run(
    mlflow, experiment: str, run_name: str, tags: dict[str, str], nested: bool = False, run_id: str | None = None
) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) a run; end it FINISHED, FAILED or KILLED. While it is open
    it carries this host and process and a heartbeat (``runs.run_liveness`` reads them).

    Under torchrun rank 0 opens the one run and every rank gets its id; when any rank fails, the
    run ends FAILED with a tag naming the rank and why, and the job raises `JobFailed`.
    """
    opened = error = failure = None
    if distributed.is_main():
        own = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: str(int(time.time()))}
        try:
            with store_call(mlflow, "starting a run"):
                _tag_experiment_kind(mlflow, mlflow.set_experiment(experiment))
                run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested,
                                       tags={**tags, **own})
            opened = run.info.run_id
        except Exception as exc:  # every rank must hear of it, or the others wait for a run id forever
            failure, error = exc, str(exc) or type(exc).__name__
        except KeyboardInterrupt as exc:  # held while the run was being opened (signals.shielded): not left RUNNING
            if (active := mlflow.active_run()) is not None:
                _end_killed(mlflow, exc, active.info.run_id)
            raise
    opened, error = distributed.broadcast_object((opened, error))
    if failure is not None:
        raise failure  # rank 0: as it came (a StoreError, or a bug with its own type)
    if error:
        raise StoreError(error)
    if not distributed.is_main():
        try:
            yield _FollowerRun(opened)
        except BaseException as exc:
            distributed.report_failure(exc)
            raise
        return
    heartbeat = _Heartbeat(mlflow.MlflowClient(), run.info.run_id)
    try:
        yield run
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM/SIGHUP through aaclip_core.signals
        heartbeat.stop()
        _end_killed(mlflow, exc, opened)
        raise
    except BaseException as exc:
        heartbeat.stop()
        summary = ""
        if distributed.active():
            try:
                summary = exc.summary if isinstance(exc, JobFailed) else distributed.failure_summary(exc)
            except RankStopped:
                # torchrun's SIGTERM came while rank 0 was already failing (a broken collective
                # comes first): the peers' reports are still what explains the failure.
                summary = distributed.failure_summary(exc)
        if isinstance(exc, RankStopped) and not summary:
            _end_killed(mlflow, exc, opened)  # stopped from outside, like an interrupt
            raise
        if summary:
            with contextlib.suppress(Exception):
                mlflow.set_tag(Tag.FAILURE, summary[:5000])
        unmarked = _end_run(mlflow, "FAILED")
        if unmarked is not None:  # the store cannot be written (a full disk): say so, and how to end it later
            raise _not_marked(exc, opened, unmarked) from exc
        if summary and not isinstance(exc, (JobFailed, AaclipError)):
            raise JobFailed(f"The {distributed.world_size()}-process job failed: {summary}. Run {opened} is "
                            "marked FAILED.", summary) from exc
        raise
    else:
        heartbeat.stop()
        with store_call(mlflow, "ending a run"):
            mlflow.end_run(status="FINISHED")


def _end_run(mlflow, status: str) -> Exception | None:
    """End the active run while another error is on its way out: a store failure here must not hide
    it, so it is returned (None when the run was ended)."""
    try:
        mlflow.end_run(status=status)
    except Exception as failure:
        return failure
    return None


def _end_killed(mlflow, exc: BaseException, run_id: str) -> None:
    """End the run KILLED; when the store cannot be written, the interrupt carries the news."""
    unmarked = _end_run(mlflow, "KILLED")
    if unmarked is not None:
        why = classify_store_failure(unmarked)
        signals.note_unended(exc, run_id, f"the store {why}" if why else
                             f"{type(unmarked).__name__}: {_first_line(unmarked)}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _not_marked(exc: BaseException, run_id: str, failure: Exception) -> RunNotMarked:
    """The job's error ``exc`` and the store's ``failure`` to end run ``run_id`` FAILED, as one
    paragraph. A feedback loop's run that could not be ended makes its job fail the same way: the
    job's run id is added to the loop's."""
    if isinstance(exc, RunNotMarked):
        return RunNotMarked(exc.cause, [*exc.run_ids, run_id], exc.why)
    cause = str(exc) if isinstance(exc, AaclipError) else f"The job failed ({type(exc).__name__}: {_first_line(exc)})."
    why = classify_store_failure(failure)
    return RunNotMarked(cause, [run_id], f"the store {why}" if why else f"{type(failure).__name__}: {_first_line(failure)}")


class _Heartbeat:
    """Refresh the run's heartbeat tag every HEARTBEAT_SECONDS from a daemon thread: cheap (one tag
    write), and independent of how long an epoch takes. A failed write is skipped, not fatal."""

    def __init__(self, client, run_id: str) -> None:
        self._client, self._run_id = client, run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="aaclip-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                self._client.set_tag(self._run_id, HEARTBEAT_TAG, str(int(time.time())))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def param_value(value: str) -> str:
    """A value as a param can hold it: MLflow caps a param's length (the full recipe is an artifact anyway)."""
    return value if len(value) <= 500 else value[:497] + "..."


def log_params(mlflow, params: dict[str, str]) -> None:
    mlflow.log_params({k: param_value(v) for k, v in params.items()})


def log_json_artifact(mlflow, obj: Any, artifact_path: str, run_id: str | None = None) -> None:
    """``obj`` as a JSON file at ``artifact_path`` of the active run, or of run ``run_id`` (a sweep's
    workers write to its parent run, which none of them has open)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(artifact_path).name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
        parent = str(Path(artifact_path).parent)
        folder = None if parent == "." else parent
        if run_id is None:
            mlflow.log_artifact(str(p), folder)
        else:
            mlflow.MlflowClient().log_artifact(run_id, str(p), folder)


_FULL_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_run_id(mlflow, run_id: str) -> str:
    """The full id of the run ``run_id`` names: a full id, or any unique prefix of one. Ambiguity and
    no match are errors that say what to do."""
    run_id = run_id.strip().lower()
    if _FULL_RUN_ID.match(run_id):
        return run_id
    if not re.fullmatch(r"[0-9a-f]+", run_id or "x"):
        raise TrackingError(
            f"'{run_id}' is not a run id (32 hexadecimal digits, or a unique prefix of one). List runs with "
            "`aaclip runs`."
        )
    matches = [r.info.run_id for r in all_runs(mlflow) if r.info.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    uri = mlflow.get_tracking_uri()
    if not matches:
        raise TrackingError(
            f"No run whose id starts with '{run_id}' in the MLflow store '{uri}'. List runs with `aaclip runs`, "
            "or point --tracking-uri at the store that holds it."
        )
    shown = ", ".join(sorted(matches)[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
    raise TrackingError(f"The id prefix '{run_id}' matches {len(matches)} runs: {shown}. Give more digits.")


def all_runs(mlflow, filter_string: str = "", experiment_ids: list[str] | None = None,
             max_results: int | None = None, order_by: list[str] | None = None) -> list:
    """Runs of every experiment (or the given ones), newest first, page by page."""
    client = mlflow.MlflowClient()
    out: list = []
    with store_call(mlflow, "listing runs"):
        if experiment_ids is None:
            experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=3)]
        if not experiment_ids:
            return out
        token = None
        while max_results is None or len(out) < max_results:
            page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                      order_by=order_by or ["attributes.start_time DESC"])
            out.extend(page)
            token = page.token
            if not token:
                break
    return out[:max_results] if max_results is not None else out


def _not_found(exc: BaseException) -> bool:
    """MLflow's own "does not exist" (a run id, an artifact path): error code RESOURCE_DOES_NOT_EXIST."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def get_run(mlflow, run_id: str):
    """The run a full id or a unique id prefix names."""
    full = resolve_run_id(mlflow, run_id)
    try:
        return mlflow.get_run(full)
    except Exception as exc:
        if _not_found(exc):
            raise TrackingError(
                f"No run '{run_id}' in the MLflow store '{mlflow.get_tracking_uri()}'. List runs with "
                "`aaclip runs`, or point --tracking-uri at the store that holds it."
            ) from None
        if classify_store_failure(exc) is not None:
            raise store_failure(mlflow.get_tracking_uri(), exc, f"reading run {full}") from None
        raise


def download(mlflow, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Download a run's artifact (a file or a folder) into the folder ``dst``. "No artifact" only when
    the run really lists none at that path; a store failure names the store; a local file-system
    failure (a full disk, a permission, a path through a file) names ``dst`` and the OS's cause;
    anything else goes on unchanged."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except Exception as exc:
        os_cause = _local_os_cause(exc, dst)
        if os_cause is None and classify_store_failure(exc) is not None:
            raise store_failure(mlflow.get_tracking_uri(), exc, f"downloading {artifact_path} of run {run_id}") from None
        if _artifact_exists(mlflow, run_id, artifact_path) is False:
            raise TrackingError(
                f"Run '{run_id}' has no artifact '{artifact_path}'. Was it trained to the end? "
                "`aaclip doctor RUN_ID` shows what the run holds."
            ) from None
        if os_cause is not None:
            temp = Path(dst).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
            hint = " (aaclip downloads into TMPDIR: point it at a folder with room)" if temp else ""
            raise LocalFileError(
                f"Cannot download artifact '{artifact_path}' of run {run_id} into {dst}: {os_cause}. Free space "
                f"there, make it writable, or move the file in the way{hint}."
            ) from None
        raise


def _local_os_cause(exc: BaseException, dst: Path) -> str | None:
    """The operating system's words for a local file-system failure in ``exc``: a plain OSError in its
    chain (not a network client's, which are OSErrors too), or one MLflow's download quotes in its
    message (it collects each file's failure as text). None when there is none."""
    for e in [exc, exc.__cause__, exc.__context__]:
        if isinstance(e, OSError) and type(e).__module__ == "builtins":
            where = f": {e.filename}" if getattr(e, "filename", None) not in (None, str(dst)) else ""
            return f"{os_cause(e)}{where}"
    quoted = re.search(r"\[Errno (\d+)\] ([^\n]+)", str(exc))
    if quoted:
        return f"{quoted.group(2).strip()} (errno {quoted.group(1)})"
    return None


def _artifact_exists(mlflow, run_id: str, artifact_path: str) -> bool | None:
    """Whether the run lists ``artifact_path`` (a file or a folder); None when the store cannot say."""
    parent = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else None
    try:
        listed = mlflow.MlflowClient().list_artifacts(run_id, parent)
    except Exception as exc:
        return False if _not_found(exc) else None  # no such run: it has no artifact either
    return any(a.path == artifact_path for a in listed)


def loop_runs(client, run) -> dict[int, Any]:
    """loop number -> child run of a feedback parent run (tag ``aaclip.loop``)."""
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=1000
    )
    return {int(c.data.tags[Tag.LOOP]): c for c in children if Tag.LOOP in c.data.tags}


def list_artifacts(mlflow, run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)]
