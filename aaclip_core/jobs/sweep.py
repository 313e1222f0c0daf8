"""`aaclip sweep`: a hyperparameter search whose trials are ordinary training runs.

A sweep is an MLflow parent run (stage ``sweep``); each trial is a base, cross or feedback run (its
MLflow child, tagged with the sweep and its trial number, its sampled settings among its params)
trained on the training images less their held-out validation split and scored on that split, the
split and metric code `train feedback` selects its loop with. ``data.test`` is never read. Feedback
trials report each loop's value to the pruner; a pruned trial's run ends KILLED, tagged pruned, its
checkpoints kept. Several workers (processes or machines) running the same ``--study`` share one
Optuna study and one parent run (:mod:`aaclip_core.sweep.study`).

Under torchrun a worker is its N ranks and every trial one N-process training job: rank 0 alone
talks to Optuna, its storage and the sweep run, and sends the other ranks each order (train this
trial with these settings, keep waiting, the study is done); they run the same job with the same
recipe, so the job's own collectives pair up as under `aaclip train`.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from aaclip_core import distributed
from aaclip_core.compute import select_device
from aaclip_core.errors import AaclipError, ConfigError, RankStopped
from aaclip_core.jobs import common
from aaclip_core.recipe import Recipe, flatten, require_sweep, with_settings
from aaclip_core.record import Artifact, Stage, Tag
from aaclip_core.registry.tracking import all_runs, connect, get_run, log_json_artifact, param_value
from aaclip_core.reporter import Reporter
from aaclip_core.signals import Stopped
from aaclip_core.sweep import space as sweep_space
from aaclip_core.sweep import study as sweep_study

# How often a worker waiting for the other workers' last trials looks again.
POLL_S = 2.0


class _Surplus(Exception):
    """A trial asked for after the study already had enough: failed unstarted, never counted."""


# What rank 0 tells the other ranks of a torchrun worker, each time they wait for it.
TRIAL, WAIT, DONE, ABORT = "trial", "wait", "done", "abort"


@dataclass(frozen=True)
class _Order:
    kind: str
    trial: int | None = None
    settings: dict = field(default_factory=dict)
    result: dict | None = None  # DONE: the sweep's summary
    error: str | None = None  # ABORT: why rank 0 could not join the study


def run_sweep(recipe: Recipe, recipe_path: Path | None = None, trials: int | None = None, study_name: str | None = None,
              storage: str | None = None, tracking_uri: str | None = None, reporter: Reporter | None = None) -> dict:
    """Work on the study until it has its trials (finished or pruned); returns the sweep's summary."""
    sweep = require_sweep(recipe)
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: a sweep needs at least one trial.")
    common.check_trainable(recipe)
    reporter = reporter or Reporter()
    target = sweep_space.target_trials(sweep, trials)
    # Under torchrun the ranks must agree on every trial before its job starts: the group is needed
    # now, not first inside the job (a no-op without torchrun).
    distributed.setup(select_device(recipe.runtime.device))
    if not distributed.is_main():
        return _follow(recipe, tracking_uri)
    try:
        mlflow, url, joined = _join(recipe, recipe_path, study_name, storage, tracking_uri, target)
    except Exception as exc:  # the other ranks wait for an order: they must hear of it, and fail alike
        _tell(_Order(ABORT, error=str(exc) or type(exc).__name__))
        raise
    study, parent, name = joined.study, joined.parent_run, joined.study.study_name
    ranks = f"; {distributed.world_size()} processes a trial" if distributed.world_size() > 1 else ""
    reporter.info(f"sweep {parent}: study '{name}' in {sweep_study.shown_url(url)}, "
                  f"{'created' if joined.founded else 'joined'}; {target} trials, objective held-out "
                  f"{sweep.objective}{ranks}")
    objective = _Objective(recipe, study, parent, name, target, tracking_uri, reporter)
    ran = 0
    while True:
        sweep_study.fail_stale(study)
        now = sweep_study.progress(study)
        if now.done(target):
            break
        if not now.may_start(target):  # the last trials are other workers': wait for them (or for them to die)
            # The other ranks hear every POLL_S that they still wait: a silent wait for other workers'
            # trials could outlast AACLIP_DIST_TIMEOUT and break their collective.
            _tell(_Order(WAIT))
            time.sleep(POLL_S)
            continue
        study.optimize(objective, n_trials=1, catch=(_Surplus,), gc_after_trial=False)
        ran += 1
    summary = _finish(mlflow, study, parent, recipe, target)
    result = {"run_id": parent, "study": name, "storage": sweep_study.shown_url(url), "trials_run_here": ran,
              **summary}
    _tell(_Order(DONE, result=result))
    return result


def _join(recipe: Recipe, recipe_path: Path | None, study_name: str | None, storage: str | None,
          tracking_uri: str | None, target: int):
    """Open the study storage and the MLflow store, create or join the study (and its sweep run)."""
    sweep = recipe.sweep
    name = study_name or f"{recipe.name}-{uuid.uuid4().hex[:8]}"
    url = sweep_study.storage_url(tracking_uri, storage)
    mlflow = connect(tracking_uri, write=True)
    if sweep.train == "cross":
        get_run(mlflow, sweep.from_run)  # a missing base run is refused before any trial
    storage_obj = sweep_study.open_storage(url, sweep.heartbeat_seconds, sweep.grace_seconds,
                                           on_stale=lambda study, trial: _end_dead_trial_run(mlflow, study, trial))
    joined = sweep_study.join(storage_obj, name, recipe, lambda founder: sweep_space.sampler(sweep, recipe, founder),
                              sweep_space.pruner(sweep),
                              lambda: _create_parent(mlflow, recipe, recipe_path, name, url, target))
    _reopen(mlflow, joined.parent_run)
    return mlflow, url, joined


def _tell(order: _Order) -> None:
    """Rank 0's order to the other ranks of a torchrun worker (nothing without torchrun)."""
    distributed.broadcast_object(order)


def _follow(recipe: Recipe, tracking_uri: str | None) -> dict:
    """A rank other than 0: never opens the study; trains each trial rank 0 orders, with the same
    recipe and settings, until rank 0 says the study is done. Returns rank 0's summary."""
    while True:
        order: _Order = distributed.broadcast_object()
        if order.kind == DONE:
            return order.result
        if order.kind == ABORT:
            raise AaclipError(order.error)
        if order.kind == TRIAL:
            with contextlib.suppress(Stopped):  # pruned: rank 0 reports it to Optuna
                train_trial(recipe.sweep, trial_recipe(recipe, order.settings), order.trial, {}, tracking_uri,
                            Reporter(), _pruning(None))


def trial_recipe(recipe: Recipe, settings: dict) -> Recipe:
    """The sweep's recipe with a trial's settings."""
    # The trial's loop is selected by the sweep's objective, so its value is the loop it stands for.
    return with_settings(recipe, {**settings, "feedback.selection_metric": recipe.sweep.objective})


def train_trial(sweep, chosen: Recipe, number: int, tags: dict, tracking_uri: str | None, reporter: Reporter,
                loop_end) -> dict:
    """Trial ``number`` of ``sweep``: the training job of its recipe ``chosen`` (on every rank alike),
    its run id and held-out value."""
    run_name = f"trial-{number}"
    if sweep.train == "feedback":
        from aaclip_core.jobs.feedback import train_feedback

        result = train_feedback(chosen, None, tracking_uri=tracking_uri, reporter=reporter, run_name=run_name,
                                tags=tags, loop_end=loop_end)
        per_loop = result["val_per_loop"]
        return {"run_id": result["run_id"], "value": per_loop.get(str(result["selected_loop"]))}
    if sweep.train == "cross":
        from aaclip_core.jobs.cross import train_cross

        result = train_cross(chosen, None, from_run=sweep.from_run, tracking_uri=tracking_uri, reporter=reporter,
                             run_name=run_name, held_out=True, tags=tags)
    else:
        from aaclip_core.jobs.base import train_base

        result = train_base(chosen, None, tracking_uri, reporter, run_name, held_out=True, tags=tags)
    return {"run_id": result["run_id"], "value": (result["val"] or {}).get(sweep.objective)}


def _pruning(decide: Callable[[int, dict, str], str | None] | None):
    """A feedback job's ``loop_end`` for every rank: rank 0 asks the pruner (``decide``, None on the
    other ranks), and every rank hears its answer, so a pruned job stops on all ranks at once."""

    def loop_end(loop: int, val: dict, run_id: str) -> None:
        why = distributed.broadcast_object(decide(loop, val, run_id) if decide is not None else None)
        if why:
            raise Stopped(why)

    return loop_end


class _Objective:
    """One trial: its settings drawn, its training run, its held-out value (what Optuna maximises)."""

    def __init__(self, recipe: Recipe, study: optuna.Study, parent: str, name: str, target: int,
                 tracking_uri: str | None, reporter: Reporter) -> None:
        self.recipe, self.study, self.parent, self.name, self.target = recipe, study, parent, name, target
        self.tracking_uri, self.reporter = tracking_uri, reporter

    def __call__(self, trial: optuna.Trial) -> float:
        if sweep_study.is_surplus(self.study, trial, self.target):
            trial.set_user_attr(sweep_study.SURPLUS, True)
            self.reporter.info(f"trial {trial.number}: another worker's trial completed the study; not run")
            raise _Surplus(f"trial {trial.number}: the study already has its {self.target} trials")
        try:
            return self._value(trial)
        except (optuna.TrialPruned, RankStopped):  # RankStopped: torchrun stopped the worker, no trial's fault
            raise
        except Exception as exc:  # Optuna fails the trial; its own log of it is silenced (sweep.study)
            self.reporter.warn(f"trial {trial.number} failed and is not counted: {' '.join(str(exc).split())[:400]} "
                               f"({type(exc).__name__})")
            raise

    def _value(self, trial: optuna.Trial) -> float:
        sweep = self.recipe.sweep
        settings = sweep_space.suggest(trial, sweep)
        tags = {Tag.SWEEP: self.parent, Tag.TRIAL: str(trial.number), Tag.STUDY: self.name,
                "mlflow.parentRunId": self.parent}
        self.reporter.info(f"trial {trial.number}: " + ", ".join(f"{k} = {v}" for k, v in settings.items()))
        chosen = trial_recipe(self.recipe, settings)
        _tell(_Order(TRIAL, trial.number, settings))
        try:
            result = train_trial(sweep, chosen, trial.number, tags, self.tracking_uri, self.reporter,
                                 _pruning(lambda loop, val, run_id: self._prune(trial, chosen, loop, val, run_id)))
        except Stopped as stop:
            raise optuna.TrialPruned(stop.reason) from None
        trial.set_user_attr(sweep_study.TRIAL_RUN, result["run_id"])
        value = result["value"]
        if value is None or not math.isfinite(value):
            raise RuntimeError(f"trial {trial.number} has no finite held-out {sweep.objective} (diverged, or "
                               "undefined on the validation split)")
        self.reporter.info(f"trial {trial.number}: held-out {sweep.objective} {100 * value:.2f}")
        return value

    def _prune(self, trial: optuna.Trial, chosen: Recipe, loop: int, val: dict, run_id: str) -> str | None:
        """Report a feedback loop's held-out value; why the pruner stops the trial here (None: go on)."""
        sweep = self.recipe.sweep
        loops = chosen.feedback.loops
        trial.set_user_attr(sweep_study.TRIAL_RUN, run_id)
        value = val.get(sweep.objective, math.nan)
        if not math.isfinite(value):
            return None
        trial.report(value, loop)
        if loop >= loops or not trial.should_prune():
            return None
        why = f"pruned after loop {loop} of {loops}: held-out {sweep.objective} {100 * value:.2f} ({sweep.pruner} pruner)"
        with contextlib.suppress(Exception):
            connect(self.tracking_uri).MlflowClient().set_tag(run_id, Tag.PRUNED, why)
        self.reporter.info(f"trial {trial.number}: {why}")
        return why


def _create_parent(mlflow, recipe: Recipe, recipe_path: Path | None, name: str, url: str, target: int) -> str:
    """The sweep's MLflow run: the recipe (its [sweep] included), the study, the target."""
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment(recipe.tracking.experiment)
    tags = {**common.run_tags(recipe, Stage.SWEEP, recipe.data.train.name), Tag.STUDY: name,
            Tag.STUDY_STORAGE: sweep_study.shown_url(url), "mlflow.runName": f"sweep-{name}"}
    run = client.create_run(experiment.experiment_id, tags=tags, run_name=f"sweep-{name}")
    run_id = run.info.run_id
    params = {k: v for k, v in flatten(recipe).items() if k.startswith("sweep.")}
    params["sweep.target_trials"] = str(target)
    client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
    with contextlib.suppress(Exception):
        log_json_artifact(mlflow, recipe.model_dump(mode="json"), Artifact.RECIPE, run_id)
    return run_id


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, param_value(value))


def _reopen(mlflow, parent: str) -> None:
    """A worker joining a study whose sweep run already ended (more --trials, a restart) reopens it."""
    client = mlflow.MlflowClient()
    if client.get_run(parent).info.status != "RUNNING":
        client.update_run(parent, status="RUNNING")


def _end_dead_trial_run(mlflow, study: optuna.Study, trial) -> None:
    """Optuna failed a trial whose worker stopped beating: its MLflow run (and a feedback run's loop
    runs), RUNNING for ever otherwise, end FAILED with the reason."""
    parent = study.user_attrs.get(sweep_study.PARENT_RUN)
    if parent is None:
        return
    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):
        found = all_runs(mlflow, f"tags.`{Tag.SWEEP}` = '{parent}' and tags.`{Tag.TRIAL}` = '{trial.number}' "
                                 "and attributes.status = 'RUNNING'")
        for run in found:
            loops = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                                 "and attributes.status = 'RUNNING'")
            for r in [*loops, run]:
                client.set_tag(r.info.run_id, Tag.FAILURE, f"the worker running trial {trial.number} of study "
                               f"'{study.study_name}' stopped: no heartbeat within sweep.grace_seconds")
                client.set_tag(r.info.run_id, Tag.ENDED_BY, "sweep")
                client.set_terminated(r.info.run_id, "FAILED")


def record_summary(client, run_id: str, tags: dict[str, str], metrics: dict[str, float]) -> None:
    """The summary's tags and metrics in one batch. Every worker that sees the study complete writes
    them, often at the same moment: two ``set_tag`` calls inserting the same new tag collide
    ("UNIQUE constraint failed: tags.key"), where a batch's tags are retried by MLflow's store."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])


def _finish(mlflow, study: optuna.Study, parent: str, recipe: Recipe, target: int) -> dict:
    """The sweep's summary on its parent run: the best trial, its value and settings, the importances
    and every trial. Each worker that sees the study complete writes it (the same numbers); the run
    ends FINISHED once no trial is running."""
    client = mlflow.MlflowClient()
    trials = sweep_study.ranked(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = complete[0] if complete else None
    importance = sweep_study.importances(study)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "run_id": t.user_attrs.get(sweep_study.TRIAL_RUN), "loops": sorted(t.intermediate_values)}
            for t in trials]
    summary = {
        "objective": recipe.sweep.objective,
        "target_trials": target,
        "finished": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number if best else None,
        "best_run": best.user_attrs.get(sweep_study.TRIAL_RUN) if best else None,
        "best_value": best.value if best else None,
        "best_settings": best.params if best else {},
        "importances": importance,
        "trials": rows,
    }
    metrics = {"finished_trials": float(summary["finished"]), "pruned_trials": float(summary["pruned"]),
               "failed_trials": float(summary["failed"])}
    tags = {}
    if best is not None:
        metrics[f"best_{recipe.sweep.objective}"] = best.value
        tags[Tag.BEST_TRIAL] = str(best.number)
        if summary["best_run"]:
            tags[Tag.BEST_RUN] = summary["best_run"]
        tags.update({Tag.best_setting(k): str(v) for k, v in best.params.items()})
    metrics.update({f"importance/{k}": v for k, v in importance.items()})
    record_summary(client, parent, tags, metrics)
    log_json_artifact(mlflow, summary, Artifact.SWEEP_TRIALS, parent)
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(parent, "FINISHED")
    return summary
