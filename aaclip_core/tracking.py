"""The run registry: every train and test is an MLflow run.

Store: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > SQLite ``mlflow.db`` in the working directory
(MLflow's own default, with its default local artifact folder). A run that raises ends FAILED, one
interrupted with Ctrl-C ends KILLED; never RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import distributed
from .errors import AaclipError, JobFailed, RankStopped, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "aaclip."  # prefix of every tag aaclip writes
# The experiment tag the MLflow 3 UI reads to pick its page: model training, not the GenAI overview.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a tracking server MLflow writes "View run/experiment at: URL" lines to stdout when a
    # run ends, which would break `--json` and `RUN=$(aaclip train ...)`: stdout is the caller's.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def resolve_tracking_uri(cli_uri: str | None) -> str:
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect(cli_uri: str | None):
    """Point MLflow at the store and return the module (imported lazily: it is slow to import)."""
    import mlflow

    _quiet_mlflow()  # after the import: mlflow sets up its own loggers when imported
    uri = resolve_tracking_uri(cli_uri)
    mlflow.set_tracking_uri(uri)
    # Exactly one run per job: under torchrun only rank 0 writes; the others may read (recipes,
    # checkpoints) but their writes go nowhere.
    return mlflow if distributed.is_main() else ReadOnlyTracking(mlflow)


_WRITES = frozenset({
    "set_experiment", "start_run", "end_run", "log_metric", "log_metrics", "log_param", "log_params", "set_tag",
    "set_tags", "log_artifact", "log_artifacts", "log_text", "log_dict", "log_figure", "log_image",
})


def _ignore(*args, **kwargs) -> None:
    return None


class ReadOnlyTracking:
    """MLflow as ranks other than 0 see it: reads pass through, writes do nothing."""

    def __init__(self, mlflow) -> None:
        self._mlflow = mlflow

    def __getattr__(self, name: str):
        if name in _WRITES:
            return _ignore
        if name == "MlflowClient":
            return lambda *a, **k: ReadOnlyTracking(self._mlflow.MlflowClient(*a, **k))
        return getattr(self._mlflow, name)


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
    """Start (or resume, with ``run_id``) a run; end it FINISHED, FAILED or KILLED.

    Under torchrun rank 0 opens the one run and every rank gets its id; when any rank fails, the
    run ends FAILED with a tag naming the rank and why, and the job raises `JobFailed`.
    """
    opened = error = None
    if distributed.is_main():
        try:
            _tag_experiment_kind(mlflow, mlflow.set_experiment(experiment))
            run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=tags)
            opened = run.info.run_id
        except Exception as exc:
            error = (
                f"Cannot open the MLflow store '{mlflow.get_tracking_uri()}' ({type(exc).__name__}: {exc}). "
                "Check --tracking-uri / MLFLOW_TRACKING_URI, or unset them to use ./mlflow.db."
            )
    opened, error = distributed.broadcast_object((opened, error))
    if error:
        raise TrackingError(error)
    if not distributed.is_main():
        try:
            yield _FollowerRun(opened)
        except BaseException as exc:
            distributed.report_failure(exc)
            raise
        return
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as exc:
        summary = ""
        if distributed.active():
            try:
                summary = exc.summary if isinstance(exc, JobFailed) else distributed.failure_summary(exc)
            except RankStopped:
                # torchrun's SIGTERM came while rank 0 was already failing (a broken collective
                # comes first): the peers' reports are still what explains the failure.
                summary = distributed.failure_summary(exc)
        if isinstance(exc, RankStopped) and not summary:
            mlflow.end_run(status="KILLED")  # stopped from outside, like an interrupt
            raise
        if summary:
            mlflow.set_tag(f"{TAG}failure", summary[:5000])
        mlflow.end_run(status="FAILED")
        if summary and not isinstance(exc, (JobFailed, AaclipError)):
            raise JobFailed(f"The {distributed.world_size()}-process job failed: {summary}. Run {opened} is "
                            "marked FAILED.", summary) from exc
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_params(mlflow, params: dict[str, str]) -> None:
    # MLflow caps a param value's length; the full recipe is an artifact anyway.
    mlflow.log_params({k: (v if len(v) <= 500 else v[:497] + "...") for k, v in params.items()})


def log_json_artifact(mlflow, obj: Any, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(artifact_path).name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
        parent = str(Path(artifact_path).parent)
        mlflow.log_artifact(str(p), None if parent == "." else parent)


def get_run(mlflow, run_id: str):
    try:
        return mlflow.get_run(run_id)
    except Exception:
        raise TrackingError(
            f"No run '{run_id}' in the MLflow store '{mlflow.get_tracking_uri()}'. List runs with "
            "`aaclip compare`, or point --tracking-uri at the store that holds it."
        ) from None


def download(mlflow, run_id: str, artifact_path: str, dst: Path) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except Exception as exc:
        raise TrackingError(
            f"Run '{run_id}' has no artifact '{artifact_path}' ({type(exc).__name__}). Was it trained to the "
            "end? `aaclip doctor RUN_ID` shows what the run holds."
        ) from None


def loop_runs(client, run) -> dict[int, Any]:
    """loop number -> child run of a feedback parent run (tag ``aaclip.loop``)."""
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=1000
    )
    return {int(c.data.tags[f"{TAG}loop"]): c for c in children if f"{TAG}loop" in c.data.tags}


def list_artifacts(mlflow, run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)]
