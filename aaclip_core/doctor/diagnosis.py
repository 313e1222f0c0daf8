"""`diagnose`: the static checks of a recipe, or a run's checks (and its probe)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from aaclip_core.doctor.checks import Check, DoctorReport
from aaclip_core.doctor.distributed import check_distributed, recipe_backend
from aaclip_core.doctor.history import run_checks
from aaclip_core.doctor.probe import probe_checks
from aaclip_core.doctor.static import check_tracking, static_checks
from aaclip_core.errors import ConfigError, TrackingError
from aaclip_core.recipe import apply_overrides, recipe_from_dict
from aaclip_core.record import Stage, Tag


def diagnose(
    run_id: str | None = None,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    probe: bool = False,
    tracking_uri: str | None = None,
    world_size: int | None = None,
) -> DoctorReport:
    """``world_size``: check a recipe for that many torchrun processes (default: the launcher's
    WORLD_SIZE, else 1); a run reports the setting it ran under."""
    from aaclip_core.recipe import load_recipe

    if run_id is None:
        if probe:
            raise ConfigError("--probe needs a RUN_ID: it loads that run's selected checkpoint.")
        r, _ = load_recipe(recipe or "base", overrides)
        n = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        return DoctorReport(None, static_checks(r, tracking_uri) + check_distributed(r, n, recipe_backend(r)))
    if world_size is not None:
        raise ConfigError("--world-size checks a recipe for N processes; a run reports the setting it ran under.")
    if recipe is not None:
        raise ConfigError("--recipe checks a recipe without a run; with RUN_ID the run's own recipe is checked "
                          "(adjust it with --set).")
    from aaclip_core.checkpoints.from_run import run_recipe as load_run_recipe
    from aaclip_core.registry.tracking import connect, get_run

    mlflow = connect(tracking_uri)
    tracking = check_tracking(tracking_uri)
    if tracking.status == "fail":
        raise TrackingError(tracking.detail + ". " + tracking.fix)
    run = get_run(mlflow, run_id)
    client = mlflow.MlflowClient()
    checks = [tracking]
    stage = run.data.tags.get(Tag.STAGE)
    if stage == Stage.SWEEP:
        return _sweep_report(mlflow, run, tracking, tracking_uri)
    if stage in (Stage.TEST, Stage.FEEDBACK_LOOP):
        # A test names its training run; a feedback loop's child is a child run of it.
        target = run.data.tags.get(Tag.SOURCE_RUN if stage == Stage.TEST else "mlflow.parentRunId")
        checks.append(Check("run kind", "pass", stage, f"a {stage} run: checking the training run {target}"))
        run = get_run(mlflow, target)
    with tempfile.TemporaryDirectory(prefix="aaclip-doctor-") as tmp:
        workdir = Path(tmp)
        try:
            run_recipe = load_run_recipe(mlflow, run.info.run_id, workdir)
        except TrackingError:
            run_recipe = None
        if run_recipe is not None and overrides:
            run_recipe = recipe_from_dict(apply_overrides(run_recipe.model_dump(mode="json"), overrides), "with --set")
        history, notes = run_checks(client, mlflow, run, run_recipe, tracking_uri)
        checks += history
        tags = run.data.tags
        checks += check_distributed(run_recipe, int(tags.get(Tag.WORLD_SIZE, "1")),
                                    tags.get(Tag.BACKEND, "none"))
        if probe:
            checks += probe_checks(mlflow, run, run_recipe, workdir)
    return DoctorReport(run.info.run_id, checks, notes)


def _sweep_report(mlflow, run, tracking: Check, tracking_uri: str | None) -> DoctorReport:
    """A sweep: its own checks (trials, failures, the best at a range's edge, the best's lead), from its summary,
    recipe and its trials' held-out scores."""
    from aaclip_core.checkpoints.from_run import run_recipe as load_run_recipe
    from aaclip_core.doctor.sweep import stored_held_out, sweep_checks
    from aaclip_core.registry.sweeps import sweep_view

    view = sweep_view(tracking_uri, run.info.run_id)
    with tempfile.TemporaryDirectory(prefix="aaclip-doctor-") as tmp:
        try:
            recipe = load_run_recipe(mlflow, run.info.run_id, Path(tmp))
        except (TrackingError, ConfigError):
            recipe = None
        checks = sweep_checks(view, recipe, stored_held_out(mlflow, Path(tmp)))
    return DoctorReport(run.info.run_id, [tracking, *checks])
