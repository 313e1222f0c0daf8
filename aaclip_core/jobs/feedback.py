"""`aaclip train feedback`: stage 1 and stage 2 alternate for N loops, each loop starting from
everything the previous one learned (SPEC §7, the improved "v2" schedule).

One parent MLflow run holds the job (checkpoints, per-loop held-out metrics, the selected loop);
one child run per loop holds that loop's per-epoch losses, learning rates and gradient norms.
Every stage of every loop ends in a checkpoint that carries the optimiser and random-number
states, so `--resume` continues exactly where an interrupted job stopped.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aaclip_core import distributed
from aaclip_core.checkpoints.checkpoint import Checkpoint, checkpoint_name, parse_checkpoint_name
from aaclip_core.checkpoints.from_run import loop_validation
from aaclip_core.errors import ConfigError, SaidByRank0
from aaclip_core.evaluation.selection import Selection, check_selection_metric, select_loop
from aaclip_core.jobs import common
from aaclip_core.jobs.cross import load_base_adapters
from aaclip_core.jobs.inherit import describe_inherited, inherit_from_run
from aaclip_core.model import AACLIP, ModelModes, build_model
from aaclip_core.prompts.names import PromptNamer, checkpoint_namer, training_namer
from aaclip_core.recipe import Recipe
from aaclip_core.record import Artifact, CheckpointStage, Stage, Tag
from aaclip_core.registry.runs import describe_owner, run_liveness
from aaclip_core.registry.tracking import connect, get_run, list_artifacts, loop_runs, tracked_run
from aaclip_core.reporter import Reporter
from aaclip_core.training.engine import StageSchedule, run_stage
from aaclip_core.training.groups import count_trainable, stage_parameters
from aaclip_core.training.schedule import WarmupCosine, loop_epochs, loop_lr

# Called after each loop's checkpoint with the loop, its held-out report and the job's run id.
LoopEnd = Callable[[int, dict, str], None]


def latest_checkpoint(names: list[str]) -> tuple[int, int] | None:
    """The last completed (loop, stage), ordered numerically (loop 10 after loop 2)."""
    parsed = [p for p in (parse_checkpoint_name(n) for n in names) if p is not None]
    return max(parsed) if parsed else None


def next_stage(done: tuple[int, int] | None) -> tuple[int, int]:
    if done is None:
        return 1, 1
    loop, stage = done
    return (loop, 2) if stage == 1 else (loop + 1, 1)


@dataclass
class FeedbackState:
    model: AACLIP
    text_opt: torch.optim.Optimizer
    image_opt: torch.optim.Optimizer
    generator: torch.Generator


def _rng_tensors(state: FeedbackState) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state(), "rng.loader": state.generator.get_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def _restore(state: FeedbackState, ckpt: Checkpoint) -> None:
    common.load_adapters(state.model, ckpt.adapters)
    state.text_opt.load_state_dict(ckpt.optimizers["text"])
    state.image_opt.load_state_dict(ckpt.optimizers["image"])
    torch.set_rng_state(ckpt.extra["rng.torch"])
    state.generator.set_state(ckpt.extra["rng.loader"])
    if "rng.cuda" in ckpt.extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt.extra["rng.cuda"])
    state.model.set_modes(ModelModes.from_manifest(ckpt.manifest))


def _configure_loop(model: AACLIP, recipe: Recipe, loop: int) -> str:
    """Cross-attention on from `cross_attn_start_loop`; from loop 2 on, stage 1 (and the text
    cross-attention's context) read the trained image path instead of the DPAM copy."""
    on = loop >= recipe.feedback.cross_attn_start_loop
    model.set_modes(ModelModes(text_cross=on, image_cross=on, context_source="dpam" if loop == 1 else "image_path"))
    return model.context_source


def _child_runs(mlflow, parent_id: str) -> dict[int, str]:
    client = mlflow.MlflowClient()
    return {loop: run.info.run_id for loop, run in loop_runs(client, client.get_run(parent_id)).items()}


def train_feedback(
    recipe: Recipe | None,
    recipe_path: Path | None = None,
    from_run: str | None = None,
    resume: str | None = None,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    loop_end: LoopEnd | None = None,
) -> dict:
    """Train a feedback job, or (``resume``, with ``recipe`` None) continue one with its own recipe.

    ``tags``: more tags on the job's run (a sweep's trial). ``loop_end(loop, held_out_report, run_id)``
    is called after each loop's checkpoint; it may stop the job (a sweep's pruner raises
    ``signals.Stopped``: the run ends KILLED, its checkpoints kept)."""
    if resume:
        if from_run or recipe is not None:
            raise ConfigError(
                "--resume continues a feedback run with its own recipe and weights; it takes no --from, "
                "--recipe, --set, --seed or --loops."
            )
        recipe, resume = _resumable_recipe(tracking_uri, resume)
        recipe_path = None
    elif recipe is None:
        raise ConfigError("train feedback needs a recipe (--recipe) or --resume RUN_ID.")
    else:
        common.check_trainable(recipe)
    inherited: dict = {}
    if from_run:
        get_run(connect(tracking_uri), from_run)
        recipe, inherited = inherit_from_run(recipe, from_run, tracking_uri)
    check_selection_metric(recipe)
    with common.open_session(recipe, recipe_path, tracking_uri, reporter) as session:
        if resume:
            _refuse_live(session.mlflow, resume)
        if from_run:
            session.reporter.info(describe_inherited(from_run, inherited))
        result = _run(session, recipe, from_run, resume, run_name, tags, loop_end)
        return {**result, "inherited": inherited} if from_run else result


def _resumable_recipe(tracking_uri: str | None, run_id: str) -> tuple[Recipe, str]:
    """The recipe and full id of a feedback parent run; any other run is refused rather than taken
    over (one whose job still runs is refused once the ranks have met: `_refuse_live`)."""
    mlflow = connect(tracking_uri)
    run = get_run(mlflow, run_id)
    run_id = run.info.run_id
    stage = run.data.tags.get(Tag.STAGE)
    if stage != Stage.FEEDBACK:
        raise ConfigError(
            f"Run {run_id} is a '{stage}' run, not a feedback job; --resume only continues an interrupted "
            "`aaclip train feedback` run (its parent run id, as printed when it started)."
        )
    with tempfile.TemporaryDirectory(prefix="aaclip-resume-") as tmp:
        return common.run_recipe(mlflow, run_id, Path(tmp)), run_id


def _refuse_live(mlflow, run_id: str) -> None:
    """Refuse a RUNNING run whose job is alive (a stale one is taken over). Under torchrun rank 0 alone
    judges and tells the others: a rank on another node cannot see the old job's processes and judges
    by the heartbeat only, so it could refuse a run that rank 0 takes over, and the job would fail
    half-started. Judged after the ranks have met, so that all of them leave at once (a rank waiting
    to meet a rank 0 that already left would sit in C++ until torchrun kills it, 30 s later)."""
    refusal = None
    if distributed.is_main():
        run = get_run(mlflow, run_id)
        if run_liveness(run) == "live":
            stop = ("the job first (a SIGTERM to its torchrun launcher ends the run KILLED)"
                    if run.data.tags.get(Tag.WORLD_SIZE, "1") not in ("", "1") else
                    "that process first (it ends the run KILLED)")
            refusal = (f"Run {run_id} is still running ({describe_owner(run)}); resuming it would train it twice. "
                       f"Stop {stop}, then resume.")
    refusal = distributed.broadcast_object(refusal)
    if refusal:
        raise ConfigError(refusal) if distributed.is_main() else SaidByRank0(refusal)


@dataclass
class FeedbackData:
    """A feedback job's data: the training images, their train/held-out split, the loaders of both
    stages and of the held-out split, and the fixed probe batch."""

    samples: list
    train: list
    val: list
    val_warning: str | None
    text_loader: object
    image_loader: object
    val_loader: object
    probe: dict


def _data(session: common.Session, recipe: Recipe) -> FeedbackData:
    """Split the training images (seeded) and build the loaders; warn when the held-out split is small."""
    samples = common.train_data(session, recipe)
    held = common.held_out_split(session, recipe, samples)
    text_loader, image_loader = common.loaders(session, held.train)
    return FeedbackData(samples, held.train, held.val, held.warning, text_loader, image_loader,
                        common.val_loader(recipe, held.val), common.probe_batch(held.train, recipe))


def _new_state(session: common.Session, recipe: Recipe) -> FeedbackState:
    """A fresh model with cross-attention and one AdamW per stage."""
    fb = recipe.feedback
    model = build_model(recipe, session.device, with_cross=True)
    betas = (0.9, 0.999)
    return FeedbackState(
        model=model,
        text_opt=torch.optim.AdamW(stage_parameters(model, 1), lr=fb.text_lr, betas=betas, weight_decay=fb.weight_decay),
        image_opt=torch.optim.AdamW(stage_parameters(model, 2), lr=fb.image_lr, betas=betas,
                                    weight_decay=fb.weight_decay),
        generator=session.generator,
    )


def _start(session: common.Session, recipe: Recipe, state: FeedbackState, from_run: str | None, resume: str | None,
           tags: dict) -> tuple[tuple[int, int] | None, PromptNamer]:
    """Where the job starts and the prompt names it trains with: after the last finished stage of the
    run it resumes (weights, optimisers and random states restored), else from a base run's adapters
    (``--from``, recorded in ``tags``), else fresh. Returns the last finished (loop, stage), if any."""
    fb = recipe.feedback
    names = training_namer(recipe, recipe.data.train)
    done = None
    if resume:
        done = latest_checkpoint([Path(p).name for p in list_artifacts(session.mlflow, resume, Artifact.CHECKPOINTS)])
        if done is None:
            session.reporter.info(f"run {resume} has no finished stage: starting from loop 1")
        elif done >= (fb.loops, 2):
            raise ConfigError(f"Feedback run {resume} already finished all {fb.loops} loops; nothing to resume.")
        else:
            name = checkpoint_name(*done)
            ckpt = common.run_checkpoint(session.mlflow, resume, name, session.workdir, with_optimizer=True)
            _restore(state, ckpt)
            # A run started before prompt names were recorded continues with the names it started with.
            names = checkpoint_namer(recipe, recipe.data.train, ckpt.manifest)
            session.reporter.info(f"resuming run {resume} after {name}")
    elif from_run:
        tags.update(load_base_adapters(session, state.model, from_run, None, None))
        # A base run's Adam state is not carried into AdamW (SPEC §7): only its weights are.
    return done, names


def _log_job(session: common.Session, recipe: Recipe, data: FeedbackData, model: AACLIP, bank) -> None:
    """What a new parent run records once: recipe, the split's images, sizes and the prompt names."""
    mlflow = session.mlflow
    common.log_recipe(session)
    common.log_metadata(session, data.train, Artifact.TRAIN_SAMPLES, recipe.data.train.root)
    common.log_metadata(session, data.val, Artifact.VAL_SAMPLES, recipe.data.train.root)
    mlflow.log_params({"trainable_parameters": count_trainable(model), "val_images": len(data.val)})
    if data.val_warning:
        mlflow.set_tag(Tag.VAL_WARNING, data.val_warning)
    common.log_prompt_names(mlflow, bank)


def _run(session: common.Session, recipe: Recipe, from_run: str | None, resume: str | None, run_name: str | None,
         extra_tags: dict[str, str] | None = None, loop_end: LoopEnd | None = None) -> dict:
    fb = recipe.feedback
    mlflow = session.mlflow
    data = _data(session, recipe)
    state = _new_state(session, recipe)
    tags = {**common.run_tags(recipe, Stage.FEEDBACK, recipe.data.train.name), **(extra_tags or {})}
    done, names = _start(session, recipe, state, from_run, resume, tags)
    start_loop, start_stage = next_stage(done)
    bank = common.anchor_bank(state.model, data.samples, names)

    with tracked_run(mlflow, recipe.tracking.experiment, run_name or f"feedback-{recipe.name}", tags,
                     run_id=resume) as parent:
        parent_id = parent.info.run_id
        if not resume:
            _log_job(session, recipe, data, state.model, bank)
        children = _child_runs(mlflow, parent_id) if resume else {}
        started = time.perf_counter()
        loop_losses: dict[int, dict[str, list[float]]] = {}
        for loop in range(start_loop, fb.loops + 1):
            session.reporter.loop(loop, fb.loops)
            loop_losses[loop] = _run_loop(session, recipe, state, bank, loop, start_stage if loop == start_loop else 1,
                                          data, parent_id, children.get(loop), loop_end)
        selection, val_per_loop = _select(session, recipe, parent_id)
        seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", seconds)
        return {
            "run_id": parent_id,
            "stage": Stage.FEEDBACK,
            "loops": fb.loops,
            "resumed_from": checkpoint_name(*done) if done else None,
            "selected_loop": selection.loop,
            "selection": selection.reason,
            "selection_fallback": selection.fallback,
            "val_metric": fb.selection_metric,
            "val_images": len(data.val),
            "val_warning": data.val_warning,
            "val_per_loop": {str(k): v for k, v in val_per_loop.items()},
            "loop_losses": {str(k): v for k, v in loop_losses.items()},
            "final_stage1_loss": _last(loop_losses, "stage1"),
            "final_stage2_loss": _last(loop_losses, "stage2"),
            "train_seconds": seconds,
        }


def _select(session: common.Session, recipe: Recipe, parent_id: str) -> tuple[Selection, dict[int, float]]:
    """The loop to keep, tagged on the parent run, and each loop's held-out selection metric. Rank 0
    reads the loops' validation results; the other ranks take its answer."""
    fb = recipe.feedback
    picked = None
    if distributed.is_main():
        val = loop_validation(session.mlflow, parent_id, session.workdir / "selection")
        picked = (select_loop(val, fb.selection_metric),
                  {k: v.get(fb.selection_metric, math.nan) for k, v in sorted(val.items())})
    selection, val_per_loop = distributed.broadcast_object(picked)
    session.mlflow.set_tags({
        Tag.SELECTED_CHECKPOINT: checkpoint_name(selection.loop, 2),
        Tag.SELECTED_LOOP: str(selection.loop),
        Tag.SELECTION: selection.reason,
        Tag.SELECTION_FALLBACK: str(selection.fallback).lower(),
    })
    if selection.fallback:
        session.reporter.warn(selection.reason)
    return selection, val_per_loop


def _last(loop_losses: dict[int, dict[str, list[float]]], key: str) -> float | None:
    for loop in sorted(loop_losses, reverse=True):
        if loop_losses[loop].get(key):
            return loop_losses[loop][key][-1]
    return None


def _run_loop(
    session: common.Session,
    recipe: Recipe,
    state: FeedbackState,
    bank,
    loop: int,
    first_stage: int,
    data: FeedbackData,
    parent_id: str,
    child_id: str | None,
    loop_end: LoopEnd | None = None,
) -> dict[str, list[float]]:
    fb = recipe.feedback
    mlflow = session.mlflow
    model = state.model
    child_tags = {**common.run_tags(recipe, Stage.FEEDBACK_LOOP, recipe.data.train.name), Tag.LOOP: str(loop),
                  "mlflow.parentRunId": parent_id}
    out: dict[str, list[float]] = {}
    with tracked_run(mlflow, recipe.tracking.experiment, f"loop {loop}", child_tags, nested=True, run_id=child_id):
        source = _configure_loop(model, recipe, loop)
        if child_id is None:
            mlflow.log_params({"loop": loop, "stage1_features": source, "cross_attention_on": model.use_text_cross})
        for stage in (1, 2):
            if stage < first_stage:
                continue
            loader, opt, base_lr, per_loop = (
                (data.text_loader, state.text_opt, fb.text_lr, fb.text_epochs_per_loop)
                if stage == 1
                else (data.image_loader, state.image_opt, fb.image_lr, fb.image_epochs_per_loop)
            )
            epochs = loop_epochs(per_loop, fb.epochs_decay_rate, loop)
            lr = loop_lr(base_lr, fb.lr_decay_per_loop, loop)
            sched = WarmupCosine(opt, lr, epochs * len(loader), fb.warmup_epochs * len(loader))
            hist = run_stage(stage, model, bank, loader, StageSchedule(opt, sched, fb.grad_clip), epochs, recipe,
                             session.device, augment_epoch_base=loop * 1000 + stage * 100,
                             log=mlflow.log_metrics, progress=session.reporter.progress,
                             epoch_end=session.reporter.epoch_end, probe_batch=data.probe)
            out[f"stage{stage}"] = hist.losses
            out[f"stage{stage}_probe"] = hist.probe_losses
            extra = {}
            if stage == 2:
                mean = common.validate(session, model, bank, data.val_loader, data.val, parent_id, checkpoint_name(loop, 2))
                extra["val"] = mean
                val = common.val_metrics(mean)
                mlflow.log_metrics(val)
                mlflow.log_metrics({**val, "loop/stage2_loss": hist.losses[-1]}, step=loop, run_id=parent_id)
                session.reporter.info(
                    f"loop {loop}: held-out " + ", ".join(f"{k[4:]} {100 * v:.2f}" for k, v in val.items())
                )
            else:
                mlflow.log_metrics({"loop/stage1_loss": hist.losses[-1]}, step=loop, run_id=parent_id)
            _save(session, state, recipe, loop, stage, epochs, parent_id, extra, bank.record())
            if stage == 2 and loop_end is not None:
                # After the checkpoint: a caller that stops the job here (a sweep's pruner) keeps it.
                loop_end(loop, extra["val"], parent_id)
    return out


def _save(session: common.Session, state: FeedbackState, recipe: Recipe, loop: int, stage: int, epochs: int,
          parent_id: str, extra: dict, prompt_names: dict) -> None:
    """Rank 0 writes and logs the loop checkpoint; the other ranks (same state) wait until it has."""
    if distributed.is_main():
        meta = common.manifest(recipe, state.model, CheckpointStage.after(stage), epochs, loop=loop,
                               prompt_names=prompt_names, **extra)
        name = checkpoint_name(loop, stage)
        local = common.save_checkpoint_dir(
            session, name, state.model, meta,
            optimizers={"text": state.text_opt.state_dict(), "image": state.image_opt.state_dict()},
            extra_tensors=_rng_tensors(state),
        )
        session.mlflow.MlflowClient().log_artifacts(parent_id, str(local), Artifact.checkpoint(name))
    distributed.barrier()
