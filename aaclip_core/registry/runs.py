"""`aaclip runs`: list the runs of a store, and end the ones whose process died.

A row says what a user needs to pick a run id for `test`, `predict`, `doctor` or `--from`: the
stage, name, status (RUNNING runs whose process is gone are marked stale), dataset, the run's main
metric, and its parent (a test run's training run, a feedback loop's job).
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from aaclip_core.distributed import process_alive
from aaclip_core.errors import ConfigError, TrackingError
from aaclip_core.names import PIXEL_AUROC
from aaclip_core.record import Stage, Tag
from aaclip_core.registry.models import versions_by_run
from aaclip_core.registry.tracking import (
    HEARTBEAT_TAG,
    HOST_TAG,
    PID_TAG,
    STALE_AFTER_SECONDS,
    all_runs,
    connect,
    get_run,
    store_call,
)

# The number a row shows: a test run's mean pixel AUROC (the protocol's headline metric); a finished
# feedback job's held-out (validation) value of its selection metric at the loop it selected; another
# training run's last epoch loss of its last stage.
_TEST_METRIC = PIXEL_AUROC
_LOSS_METRICS = ("stage2/loss", "stage1/loss")


def run_liveness(run, now: float | None = None) -> str | None:
    """For a RUNNING run: "live" or "stale" (its process is gone, or its heartbeat stopped more than
    STALE_AFTER_SECONDS ago); None for a run that is not RUNNING."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    if tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_TAG, "").isdigit():
        if not process_alive(int(tags[PID_TAG])):
            return "stale"
    beat = tags.get(HEARTBEAT_TAG)
    last = float(beat) if beat and beat.replace(".", "", 1).isdigit() else run.info.start_time / 1000
    return "stale" if (now or time.time()) - last > STALE_AFTER_SECONDS else "live"


def describe_owner(run) -> str:
    tags = run.data.tags
    beat = tags.get(HEARTBEAT_TAG, "")
    ago = f", last heartbeat {int(time.time() - float(beat))} s ago" if beat.isdigit() else ""
    # Under torchrun the run carries rank 0's process: the job to stop is its launcher.
    world = tags.get(Tag.WORLD_SIZE, "1")
    job = f" (rank 0 of a {world}-process torchrun job)" if world.isdigit() and int(world) > 1 else ""
    return f"host {tags.get(HOST_TAG, '?')}, process {tags.get(PID_TAG, '?')}{job}{ago}"


def end_stale_run(mlflow, run, status: str = "KILLED") -> list[str]:
    """End a stale RUNNING run (and its RUNNING children) as ``status``; refuse a live one."""
    liveness = run_liveness(run)
    run_id = run.info.run_id
    if liveness is None:
        raise TrackingError(f"Run {run_id} is {run.info.status}, not RUNNING: there is nothing to end.")
    if liveness == "live":
        raise TrackingError(
            f"Run {run_id} is still alive ({describe_owner(run)}); stop that process instead (it then ends "
            f"KILLED itself), or wait {int(STALE_AFTER_SECONDS)} s after it died."
        )
    client = mlflow.MlflowClient()
    with store_call(mlflow, f"ending run {run_id}"):
        children = client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"
        )
        ended = [c.info.run_id for c in children] + [run_id]
        for rid in ended:
            client.set_tag(rid, Tag.ENDED_BY, "mark-dead")
            client.set_terminated(rid, status)
    return ended


@dataclass
class RunRow:
    run_id: str
    stage: str
    name: str
    status: str
    stale: bool
    dataset: str
    metric: str | None  # the MLflow metric key; val/... is held-out (validation) data, not a test
    value: float | None
    parent: str | None
    experiment: str
    started: str
    metric_loop: int | None = None  # the loop whose value ``value`` is (a feedback job's selected loop)
    registered: list[str] = field(default_factory=list)  # "NAME/VERSION @alias" of versions registered from it

    def as_dict(self) -> dict:
        return asdict(self)


def _main_metric(run) -> tuple[str | None, float | None]:
    metrics = run.data.metrics
    stage = run.data.tags.get(Tag.STAGE)
    if stage == Stage.SWEEP:  # its best trial's held-out value (best_<objective>)
        names = tuple(k for k in metrics if k.startswith("best_"))
    elif stage == Stage.TEST:
        names = (_TEST_METRIC,)
    else:
        names = _LOSS_METRICS
    for name in names:
        if name in metrics:
            return name, float(metrics[name])
    return None, None


def _selected_value(mlflow, run) -> tuple[str, float, int] | None:
    """A feedback job's held-out ``val/<selection metric>`` at the loop it selected (the job logs
    it per loop, step = loop), with that loop; None before a selection, or when it fell back."""
    tags, metric = run.data.tags, run.data.params.get("feedback.selection_metric")
    loop = tags.get(Tag.SELECTED_LOOP)
    if not (metric and loop and loop.isdigit()) or tags.get(Tag.SELECTION_FALLBACK) == "true":
        return None
    key = f"val/{metric}"
    with store_call(mlflow, f"reading the held-out {metric} of run {run.info.run_id}"):
        at_loop = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key) if m.step == int(loop)]
    return (key, float(at_loop[-1]), int(loop)) if at_loop else None


def _row(run, experiments: dict[str, str], mlflow) -> RunRow:
    tags = run.data.tags
    metric, value = _main_metric(run)
    selected = _selected_value(mlflow, run) if tags.get(Tag.STAGE) == Stage.FEEDBACK else None
    if selected is not None:
        metric, value, loop = selected
    started = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    return RunRow(
        run_id=run.info.run_id,
        stage=tags.get(Tag.STAGE, "-"),
        name=run.info.run_name or "",
        status=run.info.status,
        stale=run_liveness(run) == "stale",
        dataset=tags.get(Tag.DATASET, "-"),
        metric=metric,
        value=value,
        parent=tags.get("mlflow.parentRunId"),
        experiment=experiments.get(run.info.experiment_id, run.info.experiment_id),
        started=started,
        metric_loop=loop if selected is not None else None,
    )


def list_runs(tracking_uri: str | None, experiment: str | None = None, stage: str | None = None,
              limit: int = 50) -> list[RunRow]:
    """The newest ``limit`` runs, optionally of one experiment and/or one stage."""
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}.")
    mlflow = connect(tracking_uri)
    client = mlflow.MlflowClient()
    with store_call(mlflow, "listing experiments"):
        experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=3)}
    ids = None
    if experiment is not None:
        ids = [i for i, name in experiments.items() if name == experiment]
        if not ids:
            known = ", ".join(sorted(experiments.values())) or "none"
            raise ConfigError(f"--experiment '{experiment}': no such experiment in the store (it has: {known}).")
    stage_filter = f"tags.`{Tag.STAGE}` = '{stage}'" if stage else ""
    if stage and not stage.replace("-", "").isalnum():
        raise ConfigError(f"--stage '{stage}' is not a stage name (base, cross, feedback, feedback-loop, test, ...).")
    runs = all_runs(mlflow, stage_filter, experiment_ids=ids, max_results=limit)
    rows = [_row(r, experiments, mlflow) for r in runs]
    registered = versions_by_run(mlflow)
    for row in rows:
        row.registered = registered.get(row.run_id, [])
    return rows


def mark_dead(tracking_uri: str | None, run_id: str) -> list[str]:
    """End a RUNNING run whose process is gone as KILLED (with its RUNNING children); returns their ids."""
    mlflow = connect(tracking_uri, write=True)
    return end_stale_run(mlflow, get_run(mlflow, run_id))
