"""`aaclip sweep`: a hyperparameter search whose trials are ordinary training runs.

A sweep is an MLflow parent run (stage ``sweep``); each trial is a base, cross or feedback run (its
MLflow child, tagged with the sweep and its trial number, its sampled settings among its params)
trained on the training images less their held-out validation split and scored on that split, the
split and metric code `train feedback` selects its loop with. ``data.test`` is never read. Feedback
trials report each loop's value to the pruner; a pruned trial's run ends KILLED, tagged pruned, its
checkpoints kept. Several workers (processes or machines) running the same ``--study`` share one
Optuna study and one parent run (:mod:`aaclip_core.sweep.study`).
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

from aaclip_core.errors import ConfigError
from aaclip_core.jobs import common
from aaclip_core.recipe import Recipe, flatten, require_sweep, with_settings
from aaclip_core.record import Artifact, Stage, Tag
from aaclip_core.registry.tracking import all_runs, connect, get_run
from aaclip_core.reporter import Reporter
from aaclip_core.signals import Stopped
from aaclip_core.sweep import space as sweep_space
from aaclip_core.sweep import study as sweep_study

# How often a worker waiting for the other workers' last trials looks again.
POLL_S = 2.0


class _Surplus(Exception):
    """A trial asked for after the study already had enough: failed unstarted, never counted."""


def run_sweep(recipe: Recipe, recipe_path: Path | None = None, trials: int | None = None, study_name: str | None = None,
              storage: str | None = None, tracking_uri: str | None = None, reporter: Reporter | None = None) -> dict:
    """Work on the study until it has its trials (finished or pruned); returns the sweep's summary."""
    sweep = require_sweep(recipe)
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: a sweep needs at least one trial.")
    common.check_trainable(recipe)
    reporter = reporter or Reporter()
    target = sweep_space.target_trials(sweep, trials)
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
    study, parent = joined.study, joined.parent_run
    reporter.info(f"sweep {parent}: study '{name}' in {sweep_study.shown_url(url)}, "
                  f"{'created' if joined.founded else 'joined'}; {target} trials, objective held-out {sweep.objective}")
    _reopen(mlflow, parent)
    objective = _Objective(recipe, study, parent, name, target, tracking_uri, reporter)
    ran = 0
    while True:
        sweep_study.fail_stale(study)
        now = sweep_study.progress(study)
        if now.done(target):
            break
        if not now.may_start(target):  # the last trials are other workers': wait for them (or for them to die)
            time.sleep(POLL_S)
            continue
        study.optimize(objective, n_trials=1, catch=(_Surplus,), gc_after_trial=False)
        ran += 1
    summary = _finish(mlflow, study, parent, recipe, target)
    return {"run_id": parent, "study": name, "storage": sweep_study.shown_url(url), "trials_run_here": ran,
            **summary}


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
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # Optuna fails the trial; its own log of it is silenced (sweep.study)
            self.reporter.warn(f"trial {trial.number} failed and is not counted: {' '.join(str(exc).split())[:400]} "
                               f"({type(exc).__name__})")
            raise

    def _value(self, trial: optuna.Trial) -> float:
        sweep = self.recipe.sweep
        settings = sweep_space.suggest(trial, sweep)
        # The trial's loop is selected by the sweep's objective, so its value is the loop it stands for.
        chosen = with_settings(self.recipe, {**settings, "feedback.selection_metric": sweep.objective})
        tags = {Tag.SWEEP: self.parent, Tag.TRIAL: str(trial.number), Tag.STUDY: self.name,
                "mlflow.parentRunId": self.parent}
        run_name = f"trial-{trial.number}"
        self.reporter.info(f"trial {trial.number}: " + ", ".join(f"{k} = {v}" for k, v in settings.items()))
        try:
            result = self._train(chosen, trial, tags, run_name)
        except Stopped as stop:
            raise optuna.TrialPruned(stop.reason) from None
        trial.set_user_attr(sweep_study.TRIAL_RUN, result["run_id"])
        value = result["value"]
        if value is None or not math.isfinite(value):
            raise RuntimeError(f"trial {trial.number} has no finite held-out {sweep.objective} (diverged, or "
                               "undefined on the validation split)")
        self.reporter.info(f"trial {trial.number}: held-out {sweep.objective} {100 * value:.2f}")
        return value

    def _train(self, recipe: Recipe, trial: optuna.Trial, tags: dict, run_name: str) -> dict:
        sweep = self.recipe.sweep
        if sweep.train == "feedback":
            from aaclip_core.jobs.feedback import train_feedback

            def loop_end(loop: int, val: dict, run_id: str) -> None:
                trial.set_user_attr(sweep_study.TRIAL_RUN, run_id)
                value = val.get(sweep.objective, math.nan)
                if not math.isfinite(value):
                    return
                trial.report(value, loop)
                if loop < recipe.feedback.loops and trial.should_prune():
                    why = (f"pruned after loop {loop} of {recipe.feedback.loops}: held-out {sweep.objective} "
                           f"{100 * value:.2f} ({sweep.pruner} pruner)")
                    with contextlib.suppress(Exception):
                        connect(self.tracking_uri).MlflowClient().set_tag(run_id, Tag.PRUNED, why)
                    self.reporter.info(f"trial {trial.number}: {why}")
                    raise Stopped(why)

            result = train_feedback(recipe, None, tracking_uri=self.tracking_uri, reporter=self.reporter,
                                    run_name=run_name, tags=tags, loop_end=loop_end)
            per_loop = result["val_per_loop"]
            return {"run_id": result["run_id"], "value": per_loop.get(str(result["selected_loop"]))}
        if sweep.train == "cross":
            from aaclip_core.jobs.cross import train_cross

            result = train_cross(recipe, None, from_run=sweep.from_run, tracking_uri=self.tracking_uri,
                                 reporter=self.reporter, run_name=run_name, held_out=True, tags=tags)
        else:
            from aaclip_core.jobs.base import train_base

            result = train_base(recipe, None, self.tracking_uri, self.reporter, run_name, held_out=True, tags=tags)
        return {"run_id": result["run_id"], "value": (result["val"] or {}).get(sweep.objective)}


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
        _log_file(mlflow, run_id, recipe.model_dump(mode="json"), Artifact.RECIPE)
    return run_id


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value if len(value) <= 500 else value[:497] + "...")


def _log_file(mlflow, run_id: str, obj, path: str) -> None:
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(path).name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
        parent = str(Path(path).parent)
        mlflow.MlflowClient().log_artifact(run_id, str(p), None if parent == "." else parent)


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
    _log_file(mlflow, parent, summary, Artifact.SWEEP_TRIALS)
    if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
        client.set_terminated(parent, "FINISHED")
    return summary
