"""`aaclip train base`: stage 1 then stage 2 with the reference optimisers (SPEC §3-4)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from aaclip_core.checkpoints.checkpoint import FINAL, STAGE1
from aaclip_core.jobs import common
from aaclip_core.model import AACLIP, build_model
from aaclip_core.prompts.names import training_namer
from aaclip_core.recipe import Recipe
from aaclip_core.record import Artifact, CheckpointStage, Stage, Tag
from aaclip_core.registry.tracking import tracked_run
from aaclip_core.reporter import Reporter
from aaclip_core.training.engine import StageSchedule, run_stage
from aaclip_core.training.groups import count_trainable, stage_parameters


def train_base(
    recipe: Recipe,
    recipe_path: Path | None = None,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    run_name: str | None = None,
    held_out: bool = False,
    tags: dict[str, str] | None = None,
) -> dict:
    """``held_out``: train on the training images less the held-out validation split and score that
    split at the end (what a sweep's trial is ranked by); ``tags``: more tags on the run."""
    common.check_train_samples(recipe)
    with common.open_session(recipe, recipe_path, tracking_uri, reporter) as session:
        samples = common.train_data(session, recipe)
        held = common.held_out_split(session, recipe, samples) if held_out else None
        session.reporter.info(f"building {recipe.model.name} ({recipe.model.pretrained}) on {session.device}")
        model = build_model(recipe, session.device)
        tags = {**common.run_tags(recipe, Stage.BASE, recipe.data.train.name), **(tags or {})}
        with tracked_run(session.mlflow, recipe.tracking.experiment, run_name or f"base-{recipe.name}", tags) as run:
            result = train_reference_stages(session, model, samples, run.info.run_id, held)
            return {"run_id": run.info.run_id, "stage": Stage.BASE, **result}


def train_reference_stages(session: common.Session, model: AACLIP, samples: list, run_id: str,
                           held: common.HeldOut | None = None) -> dict:
    """Inside an open run: log the recipe and data, train stage 1 (Adam) then stage 2 (Adam +
    MultiStepLR), checkpoint both, select the final one. Shared by `train base` and `train cross`.
    With ``held``, train on its training part and score its held-out part at the end (``val``)."""
    recipe, mlflow = session.recipe, session.mlflow
    if held is not None:
        samples = held.train
        common.log_metadata(session, held.val, Artifact.VAL_SAMPLES, recipe.data.train.root)
        mlflow.log_param("val_images", len(held.val))
        if held.warning:
            mlflow.set_tag(Tag.VAL_WARNING, held.warning)
    text_loader, image_loader = common.loaders(session, samples)
    bank = common.anchor_bank(model, samples, training_namer(recipe, recipe.data.train))
    common.log_recipe(session)
    common.log_prompt_names(mlflow, bank)
    common.log_metadata(session, samples, Artifact.TRAIN_SAMPLES, recipe.data.train.root)
    mlflow.log_param("trainable_parameters", count_trainable(model))
    started = time.perf_counter()
    probe = common.probe_batch(samples, recipe)

    s1 = recipe.stage1
    opt1 = torch.optim.Adam(stage_parameters(model, 1), lr=s1.lr, betas=s1.betas)
    h1 = run_stage(1, model, bank, text_loader, StageSchedule(opt1), s1.epochs, recipe, session.device,
                   log=mlflow.log_metrics, progress=session.reporter.progress,
                   epoch_end=session.reporter.epoch_end, probe_batch=probe)
    meta1 = common.manifest(recipe, model, CheckpointStage.STAGE1, s1.epochs, prompt_names=bank.record())
    common.save_and_log(session, STAGE1, model, meta1, opt1.state_dict())

    s2 = recipe.stage2
    opt2 = torch.optim.Adam(stage_parameters(model, 2), lr=s2.lr, betas=s2.betas)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=s2.milestones, gamma=s2.gamma)
    h2 = run_stage(2, model, bank, image_loader, StageSchedule(opt2, sched2), s2.epochs, recipe, session.device,
                   log=mlflow.log_metrics, progress=session.reporter.progress,
                   epoch_end=session.reporter.epoch_end, probe_batch=probe)
    meta = common.manifest(recipe, model, CheckpointStage.STAGE2, s2.epochs, text_epoch=s1.epochs,
                           prompt_names=bank.record())
    common.save_and_log(session, FINAL, model, meta, opt2.state_dict())
    seconds = time.perf_counter() - started
    mlflow.log_metric("train_seconds", seconds)
    mlflow.set_tag(Tag.SELECTED_CHECKPOINT, FINAL)
    val = None
    if held is not None:
        val = common.validate(session, model, bank, common.val_loader(recipe, held.val), held.val, run_id,
                              FINAL)
        mlflow.log_metrics(common.val_metrics(val))
        session.reporter.info("held-out " + ", ".join(f"{k[4:]} {100 * v:.2f}" for k, v in common.val_metrics(val).items()))
    return {
        "val": val,
        "stage1_loss": h1.losses,
        "stage2_loss": h2.losses,
        "final_stage1_loss": h1.losses[-1] if h1.losses else None,
        "final_stage2_loss": h2.losses[-1] if h2.losses else None,
        "stage1_probe_loss": h1.probe_losses,
        "stage2_probe_loss": h2.probe_losses,
        "train_seconds": seconds,
        "checkpoint": FINAL,
    }
