"""A model is a folder: a checkpoint directory whose manifest says everything needed to rebuild and
score the model, so that loading needs no tracking store.

Layout (aaclip's checkpoint format, see :mod:`aaclip_core.checkpoints.checkpoint`)::

    DIR/adapters.safetensors   the trained tensors (adapters, cross-attention modules)
    DIR/manifest.json          format, recipe, fidelity, backbone id, the model's modes
                               (cross-attention switches, context source), prompt names, where the
                               weights came from, the classes it was trained on, and the
                               calibrations of the tests made so far

Every checkpoint a run logs already has this manifest (without calibrations), so a downloaded
``checkpoints/<name>`` artifact loads the same way; ``aaclip export --format aaclip`` writes one
together with the calibrations of the run's tests. MLflow only stores and finds such folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from aaclip_core.checkpoints.checkpoint import (
    ADAPTERS,
    MANIFEST,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from aaclip_core.errors import CheckpointError, ConfigError
from aaclip_core.evaluation.calibration import Calibration
from aaclip_core.files import atomic_write_text
from aaclip_core.model import AACLIP, build_model
from aaclip_core.model.aaclip import ModelModes
from aaclip_core.recipe import Recipe, recipe_from_dict
from aaclip_core.record import Manifest, read_manifest

MODEL_FORMAT = "aaclip-model"


@dataclass
class ModelFolder:
    """A model folder read back: its checkpoint (tensors + manifest) and the recipe it was made with."""

    path: Path
    checkpoint: Checkpoint
    recipe: Recipe

    @property
    def manifest(self) -> Manifest:
        return self.checkpoint.info

    @property
    def modes(self) -> ModelModes:
        return ModelModes.from_manifest(self.manifest)

    @property
    def prompts(self) -> dict | None:
        """The prompt names the model was trained with (None: a folder written before they were recorded)."""
        return self.manifest.prompt_names

    @property
    def source(self) -> dict[str, Any]:
        """Where the weights came from: ``{"run_id", "checkpoint"}`` (None values when unknown)."""
        src = self.manifest.source or {}
        return {"run_id": src.get("run_id"), "checkpoint": src.get("checkpoint")}

    @property
    def training_classes(self) -> set[str]:
        """The classes the model was trained on (recorded at export), else those its recipe names."""
        return set(self.manifest.training_classes or self.recipe.data.train.classes or [])

    @property
    def calibrations(self) -> list[Calibration]:
        return [Calibration.from_dict(c) for c in self.manifest.calibrations or []]

    def build(self, device: torch.device | str) -> AACLIP:
        """The model, with its trained tensors and modes restored."""
        return model_from_checkpoint(self.recipe, self.checkpoint, device)


def model_from_checkpoint(recipe: Recipe, ckpt: Checkpoint, device: torch.device | str) -> AACLIP:
    """Rebuild the model a checkpoint holds: backbone and modules from ``recipe``, trained tensors
    and modes (cross-attention switches, context source) from the checkpoint."""
    meta = ckpt.info
    model = build_model(recipe, device, with_cross=bool(meta.cross_attention), final_weights=True)
    try:
        model.load_adapter_state_dict({k: v.to(device) for k, v in ckpt.adapters.items()})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint does not fit its recipe: {exc}.") from None
    model.set_modes(ModelModes.from_manifest(meta))
    return model


def read_model_folder(directory: Path) -> ModelFolder:
    """A model folder (or any aaclip checkpoint directory whose manifest holds its recipe)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"--model {directory}: no such folder. Pass a model folder written by `aaclip export --run ID DIR "
            "--format aaclip` (or a run's downloaded checkpoints/<name> folder)."
        )
    ckpt = load_checkpoint(directory)
    recipe_dict = ckpt.info.recipe
    if not isinstance(recipe_dict, dict):
        raise CheckpointError(
            f"{directory / MANIFEST} has no recipe, so the model cannot be rebuilt from the folder alone. "
            "Export it again with `aaclip export --run ID DIR --format aaclip`."
        )
    recipe = recipe_from_dict(recipe_dict, f"in {directory / MANIFEST}")
    return ModelFolder(directory, ckpt, recipe)


def write_model_folder(directory: Path, ckpt: Checkpoint, source: dict[str, Any], calibrations: list[Calibration],
                       training_classes: set[str] | None = None) -> Path:
    """Write ``ckpt`` (no optimiser state) as a model folder, atomically. An existing folder is
    replaced only if it is a model folder itself: anything else there is the user's."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"'{directory}' exists and is not a folder; pass a folder to export the model into.")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST).is_file():
        raise ConfigError(
            f"'{directory}' is a folder that holds other files; export the model into a new or empty folder "
            "(an existing model folder is replaced)."
        )
    # No optimiser state travels, and save_checkpoint writes the format version afresh.
    manifest = replace(ckpt.info, optimizers=None, format_version=None, format=MODEL_FORMAT, source=source,
                       calibrations=[c.as_dict() for c in calibrations],
                       training_classes=sorted(training_classes or []))
    try:
        return save_checkpoint(directory, ckpt.adapters, manifest.as_dict())
    except OSError as exc:
        raise ConfigError(f"Cannot write the model folder '{directory}': {exc.strerror or exc}.") from None


def add_calibration(directory: Path, calibration: Calibration) -> None:
    """Record a test's calibration in a model folder, replacing an earlier one of the same dataset
    and test; the manifest is rewritten atomically."""
    path = Path(directory) / MANIFEST
    if not (Path(directory) / ADAPTERS).is_file():
        raise CheckpointError(f"'{directory}' is not a model folder (no {ADAPTERS}).")
    manifest = read_manifest(json.loads(path.read_text(encoding="utf-8")))
    kept = [c for c in manifest.calibrations or []
            if (c.get("dataset"), c.get("test_run_id")) != (calibration.dataset, calibration.test_run_id)]
    manifest.calibrations = [*kept, calibration.as_dict()]
    atomic_write_text(path, json.dumps(manifest.as_dict(), indent=2, sort_keys=True))
