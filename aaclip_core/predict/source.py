"""Where `predict` (and `test --model`) take a model from: a run in the tracking store, or a model
folder with no store at all. Either way the result is the same: a recipe, a checkpoint, the
calibrations of the model's tests (newest first) and the classes it was trained on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aaclip_core.checkpoints.checkpoint import Checkpoint
from aaclip_core.checkpoints.from_run import (
    default_checkpoint,
    run_calibrations,
    run_checkpoint,
    run_recipe,
    training_classes,
)
from aaclip_core.checkpoints.model_folder import read_model_folder
from aaclip_core.evaluation.calibration import Calibration
from aaclip_core.recipe import Recipe
from aaclip_core.registry.tracking import get_run


@dataclass
class ModelSource:
    label: str  # "run 1a2b3c4d checkpoint 'final'" or "model folder DIR"
    recipe: Recipe
    checkpoint: Checkpoint
    checkpoint_name: str
    calibrations: list[Calibration]  # newest first
    training_classes: set[str] = field(default_factory=set)
    calibrate_hint: str = ""  # the command that would calibrate this model
    run_id: str | None = None

    @property
    def known_classes(self) -> set[str]:
        return self.training_classes.union(*(set(c.classes) for c in self.calibrations))


# ------------------------------------------------------------------------------------------ folder


def from_folder(directory: Path) -> ModelSource:
    folder = read_model_folder(directory)
    name = folder.source["checkpoint"] or folder.manifest.stage or "?"
    return ModelSource(
        label=f"model folder {folder.path}",
        recipe=folder.recipe,
        checkpoint=folder.checkpoint,
        checkpoint_name=str(name),
        calibrations=list(reversed(folder.calibrations)),  # the folder appends: newest last
        training_classes=folder.training_classes,
        calibrate_hint=f"aaclip test --model {folder.path} --dataset NAME --data-root DIR",
        run_id=folder.source["run_id"],
    )


# ------------------------------------------------------------------------------------------ run


def from_run(mlflow, run_id: str, checkpoint: str | None, workdir: Path) -> tuple[ModelSource, str | None]:
    """The model of a run at ``checkpoint`` (default: its selected one), and a note when it has no
    calibration."""
    run_id = get_run(mlflow, run_id).info.run_id  # the full id, when given a prefix
    recipe = run_recipe(mlflow, run_id, workdir)
    name = checkpoint or default_checkpoint(mlflow, run_id)
    calibrations, note = run_calibrations(mlflow, run_id, name, workdir)
    source = ModelSource(
        label=f"run {run_id} checkpoint '{name}'",
        recipe=recipe,
        checkpoint=run_checkpoint(mlflow, run_id, name, workdir),
        checkpoint_name=name,
        calibrations=calibrations,
        training_classes=training_classes(mlflow, run_id, recipe, workdir),
        calibrate_hint=f"aaclip test --run {run_id}" + (f" --checkpoint {name}" if checkpoint else ""),
        run_id=run_id,
    )
    return source, note
