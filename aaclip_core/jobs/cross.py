"""`aaclip train cross`: cross-attention modules trained on top of a base run's adapters (SPEC §6)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aaclip_core.checkpoints.checkpoint import import_reference
from aaclip_core.errors import ConfigError
from aaclip_core.jobs import common
from aaclip_core.jobs.base import train_reference_stages
from aaclip_core.jobs.inherit import describe_inherited, inherit_from_run
from aaclip_core.model import AACLIP, ModelModes, build_model
from aaclip_core.model.backbone import backbone_id
from aaclip_core.recipe import Recipe
from aaclip_core.record import Stage, Tag
from aaclip_core.registry.tracking import connect, get_run, tracked_run
from aaclip_core.reporter import Reporter


def load_base_adapters(
    session: common.Session,
    model: AACLIP,
    from_run: str | None,
    text_file: Path | None,
    image_file: Path | None,
) -> dict[str, str]:
    """Load a base run's adapters (or the reference files) into ``model``; returns tags describing
    where they came from. The cross-attention modules keep their fresh initialisation."""
    recipe = session.recipe
    if from_run:
        from_run = get_run(session.mlflow, from_run).info.run_id  # the full id, when given a prefix
        base_recipe = common.run_recipe(session.mlflow, from_run, session.workdir)
        if backbone_id(base_recipe) != backbone_id(recipe) or base_recipe.fidelity != recipe.fidelity:
            raise ConfigError(
                f"Base run {from_run} used {backbone_id(base_recipe)} ({base_recipe.fidelity}); the recipe "
                f"'{recipe.name}' uses {backbone_id(recipe)} ({recipe.fidelity}). Use a recipe with the "
                "same model.name, model.pretrained, model.image_size and fidelity as the base run."
            )
        name = common.default_checkpoint(session.mlflow, from_run)
        ckpt = common.run_checkpoint(session.mlflow, from_run, name, session.workdir)
        base = {k: v for k, v in ckpt.adapters.items() if k.startswith(("text_adapter.", "image_adapter."))}
        common.load_adapters(model, base)
        # The base's context source carries over; the fresh cross-attention keeps its switches.
        model.set_modes(replace(model.modes, context_source=ModelModes.from_manifest(ckpt.manifest).context_source))
        return {Tag.PARENT_RUN: from_run, Tag.PARENT_CHECKPOINT: name, "mlflow.parentRunId": from_run}
    if text_file is None or image_file is None:
        raise ConfigError(
            "train cross needs a base: --from BASE_RUN_ID, or both --base-text-adapter FILE and "
            "--base-image-adapter FILE (the reference text_adapter.pth / image_adapter_N.pth)."
        )
    own = model.adapter_state_dict()
    tags = {}
    for kind, path in (("text", text_file), ("image", image_file)):
        imported = import_reference(path, kind, own, recipe.model.relu)
        common.load_adapters(model, imported.adapters)
        tags[Tag.base_adapter_sha256(kind)] = imported.sha256
        tags[Tag.base_adapter_epoch(kind)] = str(imported.epoch)
    return tags


def train_cross(
    recipe: Recipe,
    recipe_path: Path | None = None,
    from_run: str | None = None,
    text_file: Path | None = None,
    image_file: Path | None = None,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    run_name: str | None = None,
    held_out: bool = False,
    tags: dict[str, str] | None = None,
) -> dict:
    """``held_out`` and ``tags``: as for `train_base`."""
    inherited: dict = {}
    if from_run:
        from_run = get_run(connect(tracking_uri), from_run).info.run_id  # the full id, when given a prefix
        recipe, inherited = inherit_from_run(recipe, from_run, tracking_uri)
    common.check_train_samples(recipe)
    with common.open_session(recipe, recipe_path, tracking_uri, reporter) as session:
        if from_run:
            session.reporter.info(describe_inherited(from_run, inherited))
        samples = common.train_data(session, recipe)
        held = common.held_out_split(session, recipe, samples) if held_out else None
        model = build_model(recipe, session.device, with_cross=True)
        origin = load_base_adapters(session, model, from_run, text_file, image_file)
        tags = {**common.run_tags(recipe, Stage.CROSS, recipe.data.train.name), **origin, **(tags or {})}
        with tracked_run(session.mlflow, recipe.tracking.experiment, run_name or f"cross-{recipe.name}", tags) as run:
            result = train_reference_stages(session, model, samples, run.info.run_id, held)
            return {"run_id": run.info.run_id, "stage": Stage.CROSS, "parent_run_id": from_run, "inherited": inherited,
                    **result}

