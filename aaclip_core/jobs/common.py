"""What every job shares: session set-up, run tags and checkpoint logging. Loading runs back is
:mod:`aaclip_core.checkpoints.from_run`, re-exported here for the jobs."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aaclip_core import distributed
from aaclip_core.checkpoints.checkpoint import save_checkpoint
from aaclip_core.checkpoints.from_run import (  # noqa: F401 - re-exported: the jobs call them as common.X
    default_checkpoint,
    load_adapters,
    manifest,
    model_from_checkpoint,
    run_checkpoint,
    run_recipe,
)
from aaclip_core.compute import configure_threads, seed_everything, select_device
from aaclip_core.data import Sample, train_val_split, write_metadata_jsonl
from aaclip_core.data.splits import small_split_warning
from aaclip_core.errors import ConfigError, LocalFileError
from aaclip_core.evaluation.pixel_pairs import save_pixel_pairs
from aaclip_core.evaluation.protocol import EvalReport, evaluate
from aaclip_core.evaluation.selection import check_selection_metric
from aaclip_core.files import os_cause
from aaclip_core.model import AACLIP
from aaclip_core.model.backbone import backbone_id
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.prompts.names import PROMPT_PARAM, PromptNamer
from aaclip_core.prompts.templates import split_prompts
from aaclip_core.recipe import Recipe, flatten
from aaclip_core.record import Artifact, Stage, Tag
from aaclip_core.registry.tracking import aaclip_version, connect, git_commit, log_json_artifact, log_params
from aaclip_core.reporter import Reporter
from aaclip_core.training.data import fixed_batch, load_samples, make_dataset, make_loader


@dataclass
class Session:
    recipe: Recipe
    device: torch.device
    mlflow: Any
    reporter: Reporter
    workdir: Path
    generator: torch.Generator
    recipe_path: Path | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # A job holds its session in a ``with`` block: the work directory goes however the job ends.
    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_session(recipe: Recipe, recipe_path: Path | None, tracking_uri: str | None, reporter: Reporter | None,
                 store: bool = True) -> Session:
    """Threads, seed (before any model is built: the demo backbone is random) and device; the
    tracking store unless ``store`` is False (a model folder's test needs none)."""
    configure_threads(recipe.runtime.threads)
    # Every rank seeds alike: same initial adapters, same shuffled order (each takes its share).
    generator = seed_everything(recipe.runtime.seed)
    device = distributed.setup(select_device(recipe.runtime.device))
    mlflow = connect(tracking_uri, write=True) if store else None
    workdir = _work_folder()
    # Only rank 0 shows progress: N progress bars of one job would say the same thing N times.
    shown = reporter if reporter is not None and distributed.is_main() else Reporter()
    return Session(recipe, device, mlflow, shown, workdir, generator, recipe_path)


def _work_folder() -> Path:
    """The job's scratch folder (checkpoints before they are logged), in the temporary folder."""
    try:
        return Path(tempfile.mkdtemp(prefix="aaclip-"))
    except OSError as exc:
        raise LocalFileError(
            f"Cannot create the job's work folder in the temporary folder {tempfile.gettempdir()}: {os_cause(exc)}. "
            "Set TMPDIR to a writable folder on a disk with room and run again."
        ) from None


def run_tags(recipe: Recipe, stage: Stage, dataset: str) -> dict[str, str]:
    return {
        Tag.STAGE: Stage(stage).value,
        Tag.FIDELITY: recipe.fidelity,
        Tag.DATASET: dataset,
        Tag.SEED: str(recipe.runtime.seed),
        Tag.VERSION: aaclip_version(),
        Tag.GIT_COMMIT: git_commit(),
        Tag.BACKBONE: backbone_id(recipe),
        Tag.QUICK_GELU: str(recipe.quick_gelu).lower(),
        Tag.RECIPE: recipe.name,
        # The distributed setting the job ran under (1 / none without torchrun).
        Tag.WORLD_SIZE: str(distributed.world_size()),
        Tag.BACKEND: distributed.setting().backend,
    }


def log_recipe(session: Session) -> None:
    mlflow = session.mlflow
    log_params(mlflow, flatten(session.recipe))
    setting = distributed.setting()
    mlflow.log_params({"distributed.world_size": setting.world_size, "distributed.backend": setting.backend})
    log_json_artifact(mlflow, session.recipe.model_dump(mode="json"), Artifact.RECIPE)
    if session.recipe_path is not None and session.recipe_path.is_file():
        mlflow.log_artifact(str(session.recipe_path), Artifact.RECIPE_SOURCE)


def log_metadata(session: Session, samples: list[Sample], name: str, root: str) -> None:
    """The sample list a run actually used, in the reference JSON-lines format."""
    if not distributed.is_main():
        return
    path = session.workdir / name
    write_metadata_jsonl(samples, path, Path(root).expanduser().resolve())
    session.mlflow.log_artifact(str(path), Artifact.DATA)


def save_checkpoint_dir(session: Session, name: str, model: AACLIP, meta: dict, **states) -> Path:
    """Write a checkpoint of the model's trainable state into the session's work directory."""
    return save_checkpoint(session.workdir / Artifact.CHECKPOINTS / name, model.adapter_state_dict(), meta, **states)


def save_and_log(session: Session, name: str, model: AACLIP, meta: dict, optimizer_state: dict | None = None) -> None:
    """Rank 0 writes and logs the checkpoint; the other ranks (same weights) wait until it has."""
    if distributed.is_main():
        local = save_checkpoint_dir(session, name, model, meta, optimizer_state=optimizer_state)
        session.mlflow.log_artifacts(str(local), Artifact.checkpoint(name))
    distributed.barrier()


def probe_batch(samples: list[Sample], recipe: Recipe, size: int = 16) -> dict:
    """A fixed, un-augmented batch spread over the training images, for the per-epoch probe loss."""
    step = max(1, len(samples) // size)
    return fixed_batch(samples[::step][:size], recipe)


def train_data(session: Session, recipe: Recipe) -> list[Sample]:
    samples = load_samples(recipe.data.train, recipe.runtime.seed)
    session.reporter.info(
        f"train data: {len(samples)} images of {len({s.class_name for s in samples})} classes "
        f"from {recipe.data.train.root}"
    )
    return samples


@dataclass
class HeldOut:
    """The training images split (seeded, stratified) into the part trained on and the held-out
    validation part every loop selection and every sweep trial is scored on."""

    train: list[Sample]
    val: list[Sample]
    warning: str | None  # the held-out split is too small for its metrics to select on


def held_out_split(session: Session, recipe: Recipe, samples: list[Sample]) -> HeldOut:
    """Split by ``feedback.val_fraction`` and ``runtime.seed``; refuse a split on which the selection
    metric is undefined; warn when it is small. The one split `train feedback` and `aaclip sweep` use."""
    fb = recipe.feedback
    train_s, val_s = train_val_split(samples, fb.val_fraction, recipe.runtime.seed)
    check_selection_metric(recipe, [s.label for s in val_s])
    session.reporter.info(f"held-out validation split: {len(val_s)} images (seed {recipe.runtime.seed})")
    small = small_split_warning(val_s, fb.min_val_images)
    if small:
        small += (f". Raise feedback.val_fraction (now {fb.val_fraction})"
                  + (f" or data.train.shot (now {recipe.data.train.shot})" if recipe.data.train.shot else "")
                  + f", add labelled images, or lower feedback.min_val_images (now {fb.min_val_images}) to accept it")
        session.reporter.warn(small)
    return HeldOut(train_s, val_s, small)


def val_loader(recipe: Recipe, val: list[Sample]):
    return make_loader(make_dataset(val, recipe, "none"), recipe.eval.batch_size, False, recipe, None)


def validate(session: Session, model: AACLIP, bank: AnchorBank, loader, val: list[Sample], run_id: str,
             checkpoint: str) -> dict[str, float]:
    """The held-out split's mean report (metric -> value). Its per-image scores and pixel pairs are kept
    on run ``run_id`` (``Artifact.validation(checkpoint)``): a lead of one sweep trial over another is
    only judged by bootstrapping them over the validation images. Under torchrun the ranks score its
    batches round-robin, rank 0 computes the report from the gathered maps (and keeps the scores), and
    every rank returns its numbers."""
    # Relative to the data root: workers of one sweep on other machines may mount the data elsewhere,
    # and the doctor pairs two trials' scores by image.
    root = Path(session.recipe.data.train.root).expanduser().resolve()
    paths = [Path(os.path.relpath(Path(s.image_path).resolve(), root)).as_posix() for s in val]
    report = evaluate(model, bank, loader, session.recipe, session.device, sample_paths=paths)
    if report is not None:
        log_scores(session.mlflow, run_id, report, Artifact.validation(checkpoint), session.workdir)
    return distributed.broadcast_object(report.mean if report is not None else None)


def log_scores(mlflow, run_id: str, report: EvalReport, folder: str, workdir: Path) -> None:
    """A report's per-image scores and pixel pairs, files in ``folder`` of run ``run_id``: what a
    bootstrap over its images reads back (`compare` a test run's, `doctor` a sweep trial's)."""
    client = mlflow.MlflowClient()
    client.log_text(run_id, csv_text(report.image_scores), f"{folder}/{Artifact.IMAGE_SCORES}")
    if report.pixel_pairs:
        local = workdir / folder / Artifact.PIXEL_PAIRS
        local.parent.mkdir(parents=True, exist_ok=True)
        save_pixel_pairs(local, report.pixel_pairs)
        client.log_artifact(run_id, str(local), folder)


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def val_metrics(mean: dict[str, float]) -> dict[str, float]:
    """The ``val/<metric>`` MLflow metrics of a held-out report (undefined metrics left out)."""
    import math

    return {f"val/{k}": v for k, v in mean.items() if not math.isnan(v)}


def loaders(session: Session, samples: list[Sample]):
    r = session.recipe
    text_ds = make_dataset(samples, r, augment="geometric")
    image_ds = make_dataset(samples, r, augment="geometric+colour")
    return (
        make_loader(text_ds, r.stage1.batch_size, True, r, session.generator),
        make_loader(image_ds, r.stage2.batch_size, True, r, session.generator),
    )


def anchor_bank(model: AACLIP, samples: list[Sample], names: PromptNamer) -> AnchorBank:
    return AnchorBank(model, [s.class_name for s in samples], names)


def prompt_names_document(bank: AnchorBank) -> dict:
    """Every class's prompt name, where it came from and its 16 sentences."""
    classes = {}
    for c, p in bank.prompt_names.items():
        normal, abnormal = split_prompts(p.name)
        classes[c] = {"name": p.name, "source": p.source, "normal": normal, "abnormal": abnormal}
    return {"dataset": bank.namer.dataset, "table": bank.namer.table, "classes": classes}


def log_prompt_names(mlflow, bank: AnchorBank) -> None:
    """The prompt names a run used: a ``prompt.<class>`` param each (what `compare` checks) and the
    full document with the sentences as an artifact (what `aaclip prompts --run` shows)."""
    log_params(mlflow, {PROMPT_PARAM + _param_key(c): p.name for c, p in bank.prompt_names.items()})
    log_json_artifact(mlflow, prompt_names_document(bank), Artifact.PROMPT_NAMES)


def _param_key(class_name: str) -> str:
    # MLflow keys allow letters, digits, "_", "-", ".", " " and "/": anything else becomes "_".
    return re.sub(r"[^\w\-. /]", "_", class_name)


def check_trainable(recipe: Recipe) -> None:
    """Settings that are valid for evaluation but not for training."""
    if recipe.runtime.precision == "fp16":
        raise ConfigError(
            "runtime.precision = 'fp16' is for evaluation only: fp16 training would need loss scaling. "
            "Train with bf16 (GPU) or fp32."
        )


def check_train_samples(recipe: Recipe) -> None:
    check_trainable(recipe)
    if recipe.stage1.epochs == 0 and recipe.stage2.epochs == 0:
        raise ConfigError("stage1.epochs and stage2.epochs are both 0: nothing to train.")
