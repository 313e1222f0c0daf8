"""The study several workers share: where it lives, joining it, its one MLflow parent run, and how
many trials it still needs.

Where: an Optuna RDB storage. For a SQLite tracking store (``sqlite:///mlflow.db``) it is the sibling
file ``mlflow.optuna.db`` (not the same database: Optuna and MLflow both keep an ``alembic_version``
table, so one file cannot hold both schemas); for any other store (an ``http://`` tracking server)
``--storage URL`` names it (PostgreSQL/MySQL for several machines, or a SQLite file every worker
sees). MLflow's own ``mlflow.optuna.MlflowStorage`` is not used: it has no heartbeat, so a killed
worker's trial would stay RUNNING for ever, and it numbers trials from a metric history written by
every worker at once (see docs/sweeps.md, "Where the study lives").

Dead workers: the storage carries Optuna's heartbeat (``sweep.heartbeat_seconds``); a RUNNING trial
whose heartbeat is older than ``sweep.grace_seconds`` is failed by the next worker
(``optuna.storages.fail_stale_trials``, which Optuna also runs before each trial) and never counted.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from aaclip_core.errors import ConfigError, StoreError
from aaclip_core.recipe import Recipe
from aaclip_core.registry.tracking import resolve_tracking_uri, sqlite_path

# The study's user attributes aaclip writes (the founder, once).
PARENT_RUN = "aaclip.sweep_run"  # the sweep's MLflow parent run
SPACE = "aaclip.space"  # the objective and search space, as JSON: a worker with another one is refused
# A trial's user attributes.
TRIAL_RUN = "aaclip.run"  # the trial's MLflow run
SURPLUS = "aaclip.surplus"  # a trial asked for after the study already had enough: failed unstarted
# States that count towards the study's trials, and those that may still do so.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
# How long a worker that did not create the study waits for its creator to name the parent run.
FOUNDER_WAIT_S = 30.0

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _NoTrialFailures(logging.Filter):
    """Optuna logs a failed trial as two warnings, the first with the objective's traceback (a SIGTERM's
    included). A worker reports its failed trials itself, in one line (:mod:`aaclip_core.jobs.sweep`),
    and the CLI a SIGTERM in one paragraph."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _TRIAL_FAILED.match(record.getMessage())


_TRIAL_FAILED = re.compile(r"^Trial \d+ failed")
logging.getLogger("optuna.study._optimize").addFilter(_NoTrialFailures())


def storage_url(tracking_uri: str | None, storage: str | None) -> str:
    """``--storage``, else the Optuna database beside a SQLite tracking store."""
    if storage:
        return storage
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is None:
        raise ConfigError(
            f"The tracking store '{uri}' is not a SQLite file, so aaclip cannot place the study beside it: pass "
            "--storage URL, an Optuna database every worker can reach (e.g. postgresql://user@host/optuna, or "
            "sqlite:////shared/folder/optuna.db on a file system all workers mount)."
        )
    return f"sqlite:///{db.with_name(db.stem + '.optuna.db')}"


def shown_url(url: str) -> str:
    """The storage URL without its password (what tags and messages show)."""
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


# Optuna 4.9 renamed the stale-trial callback (the old name still works, with a FutureWarning users would
# see on every sweep); the accepted range starts before the rename.
_STALE_CALLBACK = ("heartbeat_stale_trial_callback"
                   if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                   else "failed_trial_callback")


def open_storage(url: str, heartbeat_s: int, grace_s: int,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.RDBStorage:
    """The study database, created (under a file lock for SQLite: two workers creating its tables at
    once collide) with Optuna's heartbeat switched on."""
    db = sqlite_path(url)
    kwargs: dict = {}
    lock = contextlib.nullcontext()
    if db is not None:
        if not db.parent.is_dir():
            raise ConfigError(f"The study storage '{url}' cannot be opened: the folder {db.parent} does not exist. "
                              "Create it or fix --storage.")
        # A busy SQLite file waits instead of failing at once ("database is locked").
        kwargs = {"connect_args": {"timeout": 60}}
        from filelock import FileLock

        lock = FileLock(str(db) + ".lock", timeout=120)
    try:
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=grace_s, **{_STALE_CALLBACK: on_stale})
    except (ImportError, ValueError) as exc:  # an unknown dialect or driver, a malformed URL
        raise ConfigError(f"The study storage '{shown_url(url)}' cannot be used: {exc}. Pass --storage as an "
                          "SQLAlchemy URL, e.g. sqlite:///optuna.db or postgresql://user@host/db.") from None
    except Exception as exc:  # the database itself: unreachable, refused, read-only
        raise StoreError(f"The study storage '{shown_url(url)}' cannot be opened: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:400]}. Check --storage and that this machine reaches it.") \
            from None


def space_document(recipe: Recipe) -> str:
    sweep = recipe.sweep
    return json.dumps({"objective": sweep.objective, "train": sweep.train,
                       "space": {k: (v if isinstance(v, list) else v.model_dump()) for k, v in sweep.space.items()}},
                      sort_keys=True)


@dataclass
class Joined:
    study: optuna.Study
    parent_run: str
    founded: bool  # this worker created the study


def join(storage, name: str, recipe: Recipe, sampler: Callable[[bool], optuna.samplers.BaseSampler], pruner,
         create_parent: Callable[[], str]) -> Joined:
    """Create the study ``name`` or join it. The worker whose ``create_study`` succeeds (the database
    refuses a second study of one name) creates the MLflow parent run and writes its id into the
    study; the others wait for it. A study aaclip did not create (or whose creator died before naming
    its parent) gets a parent from the first worker that finds none after waiting. ``sampler(founded)``
    makes this worker's sampler: seeded alike, two workers would draw the same settings."""
    space = space_document(recipe)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler(True),
                                    pruner=pruner)
        founded = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler(False), pruner=pruner)
        founded = False
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"Study '{name}' minimises its objective; an aaclip sweep maximises a held-out metric. "
                          "Use another --study name.")
    if founded:
        study.set_user_attr(SPACE, space)
        parent = create_parent()
        study.set_user_attr(PARENT_RUN, parent)
        return Joined(study, parent, True)
    deadline = time.monotonic() + FOUNDER_WAIT_S
    while PARENT_RUN not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    attrs = study.user_attrs
    if attrs.get(SPACE, space) != space:
        raise ConfigError(
            f"Study '{name}' searches another space or objective than this recipe's [sweep] ({attrs[SPACE]}). "
            "Every worker of a study must run the same sweep: use the recipe the study started with, or another "
            "--study name."
        )
    if PARENT_RUN not in attrs:
        study.set_user_attr(SPACE, space)
        study.set_user_attr(PARENT_RUN, create_parent())
    return Joined(study, study.user_attrs[PARENT_RUN], False)


def fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker stopped beating (Optuna's own check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@dataclass(frozen=True)
class Progress:
    counted: int  # finished or pruned
    running: int

    def done(self, target: int) -> bool:
        return self.counted >= target

    def may_start(self, target: int) -> bool:
        return self.counted + self.running < target


def progress(study: optuna.Study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return Progress(sum(t.state in COUNTED for t in trials), len(running))


def is_surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """Whether ``trial`` was created after enough others (finished, pruned or running, with a lower
    number) to complete the study: two workers that both saw one trial missing asked for one each,
    and only the first (the database numbers trials atomically) may run."""
    ahead = [t for t in study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
             if t.number < trial.number]
    return len(ahead) >= target


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that ran (not surplus), best first: finished by value, then pruned, then the rest."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAIL: 3}
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
    return sorted(trials, key=lambda t: (order.get(t.state, 4), -(t.value if t.value is not None else -1e30),
                                         t.number))


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances over the finished trials; empty when there are too few (fewer than
    two finished trials, or no setting that varied)."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(finished) < 2 or not any(len({repr(t.params.get(k)) for t in finished}) > 1
                                    for k in finished[0].params):
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}
