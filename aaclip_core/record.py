"""The run record: what aaclip writes into the tracking store and into a checkpoint, declared once so
that the jobs that write it and the rooms that read it back (compare, doctor, predict, export) spell
it the same way.

- :class:`Tag`: the tags on a run (all under ``aaclip.``), with helpers for the parametrised ones;
- :class:`Stage`: what a run is (its ``aaclip.stage`` tag) and :class:`CheckpointStage`: what a
  checkpoint holds (its manifest's ``stage``);
- :class:`Artifact`: where a run's files live among its artifacts, and the checkpoint names;
- :class:`Manifest`: a checkpoint's ``manifest.json``, typed, with the one reader
  (:func:`read_manifest`) that also reads the manifests older aaclip versions wrote.

It sits in the bottom layer of the import contract (standard library only): every room may use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

# ------------------------------------------------------------------------------------------ tags

TAG_PREFIX = "aaclip."  # every tag aaclip writes starts with it


class Tag:
    """The names of the tags aaclip sets on a run."""

    # Every run (jobs.common.run_tags)
    STAGE = "aaclip.stage"
    FIDELITY = "aaclip.fidelity"
    DATASET = "aaclip.dataset"
    SEED = "aaclip.seed"
    VERSION = "aaclip.version"
    GIT_COMMIT = "aaclip.git_commit"
    BACKBONE = "aaclip.backbone"
    QUICK_GELU = "aaclip.quick_gelu"
    RECIPE = "aaclip.recipe"
    WORLD_SIZE = "aaclip.world_size"
    BACKEND = "aaclip.backend"
    # Liveness and endings (registry)
    HOST = "aaclip.host"
    PID = "aaclip.pid"
    HEARTBEAT = "aaclip.heartbeat"
    FAILURE = "aaclip.failure"
    ENDED_BY = "aaclip.ended_by"
    # What a training run declares as its result
    SELECTED_CHECKPOINT = "aaclip.selected_checkpoint"
    SELECTED_LOOP = "aaclip.selected_loop"
    SELECTION = "aaclip.selection"
    SELECTION_FALLBACK = "aaclip.selection_fallback"
    VAL_WARNING = "aaclip.val_warning"
    LOOP = "aaclip.loop"  # a feedback run's child: which loop it is
    # A cross run: the run and checkpoint it started from
    PARENT_RUN = "aaclip.parent_run"
    PARENT_CHECKPOINT = "aaclip.parent_checkpoint"
    # A sweep (its parent run) and its trials (each a training run, the sweep's MLflow child)
    STUDY = "aaclip.study"  # the Optuna study's name, on the sweep and on its trials
    STUDY_STORAGE = "aaclip.study_storage"  # where the study lives (an Optuna storage URL, no password)
    SWEEP = "aaclip.sweep"  # a trial: its sweep's run id
    TRIAL = "aaclip.trial"  # a trial: its number in the study
    PRUNED = "aaclip.pruned"  # a trial the pruner stopped: "true", and why
    BEST_TRIAL = "aaclip.best_trial"  # a sweep: the number and run id of its best trial
    BEST_RUN = "aaclip.best_run"
    # An imported run
    RELU = "aaclip.relu"
    # A test run: what it tested and whether that model had seen the data
    SOURCE_RUN = "aaclip.source_run"
    SOURCE_STAGE = "aaclip.source_stage"
    CHECKPOINT = "aaclip.checkpoint"
    TRAIN_DATASET = "aaclip.train_dataset"
    SAME_DATASET = "aaclip.same_dataset"
    SAME_DATASET_DECLARED_BY = "aaclip.same_dataset_declared_by"
    TRAINING_DATA = "aaclip.training_data"

    # A sweep: one of its best trial's settings (a space key, as written in the recipe)
    @staticmethod
    def best_setting(key: str) -> str:
        return f"{TAG_PREFIX}best.{key}"

    # An imported run, per adapter part ("text_adapter" / "image_adapter"): imported or untrained,
    # and the reference file's digest and epoch.
    @staticmethod
    def adapter(part: str) -> str:
        return f"{TAG_PREFIX}{part}"

    @staticmethod
    def adapter_sha256(part: str) -> str:
        return f"{TAG_PREFIX}{part}.sha256"

    @staticmethod
    def adapter_epoch(part: str) -> str:
        return f"{TAG_PREFIX}{part}.epoch"

    # A cross run started from an imported run, per kind ("text" / "image"): the files it inherited.
    @staticmethod
    def base_adapter_sha256(kind: str) -> str:
        return f"{TAG_PREFIX}base_{kind}_adapter_sha256"

    @staticmethod
    def base_adapter_epoch(kind: str) -> str:
        return f"{TAG_PREFIX}base_{kind}_adapter_epoch"


# ------------------------------------------------------------------------------------------ stages


class VersionTag:
    """The tags `aaclip register` sets on a registered model version (MLflow Model Registry)."""

    SOURCE_RUN = "aaclip.source_run"  # the training run the detector was exported from
    CHECKPOINT = "aaclip.checkpoint"
    STAGE = "aaclip.stage"
    RECIPE_HASH = "aaclip.recipe_hash"
    VERSION = "aaclip.version"  # the aaclip version that exported it
    PRECISION = "aaclip.precision"  # fp32 or int8
    CALIBRATED = "aaclip.calibrated"  # "true", or "false": raw scores, no verdicts
    CALIBRATION_RUN = "aaclip.calibration_run"  # the test run whose calibration is baked in
    CALIBRATION_DATASET = "aaclip.calibration_dataset"
    CLASSES = "aaclip.classes"  # the classes baked into the detector, comma-separated
    CALIBRATED_CLASSES = "aaclip.calibrated_classes"

    @staticmethod
    def test_metric(name: str) -> str:
        """The calibration test run's metric ``name`` (aaclip_core.names), e.g. aaclip.test.pixel_auroc."""
        return f"aaclip.test.{name}"


class _Word(str, Enum):
    """A str-valued enum that prints, formats and serialises as its bare value, so that tags, MLflow
    filters and JSON stay byte-identical to the plain strings older versions wrote."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Stage(_Word):
    """What a run is: its ``aaclip.stage`` tag."""

    BASE = "base"
    CROSS = "cross"
    FEEDBACK = "feedback"
    FEEDBACK_LOOP = "feedback-loop"  # a feedback run's child, one per loop (metrics only)
    TEST = "test"
    IMPORTED = "imported"
    SWEEP = "sweep"  # a hyperparameter search: the parent of its trials (training runs)


# The runs that hold checkpoints (what compare, test and export take).
TRAINING_STAGES = (Stage.BASE, Stage.CROSS, Stage.FEEDBACK, Stage.IMPORTED)


class CheckpointStage(_Word):
    """What a checkpoint holds: its manifest's ``stage`` (after stage 1 or 2 of training, or imported)."""

    STAGE1 = "stage1"
    STAGE2 = "stage2"
    IMPORTED = "imported"

    @classmethod
    def after(cls, stage: int) -> CheckpointStage:
        """The checkpoint stage after training stage ``stage`` (1 or 2)."""
        return cls(f"stage{stage}")


# ------------------------------------------------------------------------------------------ artifacts

# A run's checkpoints are artifacts under ``checkpoints/<name>``: base, cross and imported runs end
# in FINAL (base also keeps STAGE1); a feedback run keeps one per stage of every loop.
FINAL = "final"
STAGE1 = "stage1"
_LOOP_NAME = re.compile(r"^loop_(\d+)_stage_(\d)$")


def checkpoint_name(loop: int, stage: int) -> str:
    """The name of a feedback run's checkpoint after ``stage`` (1 or 2) of ``loop``."""
    return f"loop_{loop}_stage_{stage}"


def parse_checkpoint_name(name: str | None) -> tuple[int, int] | None:
    """(loop, stage) of a feedback checkpoint name; None for any other name."""
    m = _LOOP_NAME.match(name or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


class Artifact:
    """Where a run's files live among its artifacts (paths relative to the run's artifact root)."""

    RECIPE = "recipe.json"  # the recipe the run ran with, as JSON
    RECIPE_SOURCE = "recipe_source"  # folder: the recipe file as given, when there was one
    IMPORT = "import.json"  # an imported run: where its files came from
    PROMPT_NAMES = "prompts/names.json"  # the prompt names (and sentences) a run used
    VISUALIZATIONS = "visualizations"  # folder: a test's anomaly-map pictures, per class
    # The sample lists a training run used (reference JSON-lines format)
    DATA = "data"
    TRAIN_SAMPLES = "train.jsonl"
    VAL_SAMPLES = "val.jsonl"
    # A test run's results
    RESULTS = "results"
    REPORT = "report.json"
    PER_CLASS = "per_class.csv"
    IMAGE_SCORES = "image_scores.csv"
    PIXEL_PAIRS = "pixel_pairs.npz"
    # A sweep's summary: every trial (number, state, value, settings, run), the best, the importances
    SWEEP_TRIALS = "sweep/trials.json"
    # A training run's held-out scores, a folder per checkpoint scored on the validation split (base and
    # cross trained held-out: final; feedback: each loop's stage 2), holding IMAGE_SCORES and PIXEL_PAIRS
    # with image paths relative to data.train.root: what a bootstrap over the validation images needs.
    VALIDATION = "validation"
    # A training run's checkpoints, one folder each
    CHECKPOINTS = "checkpoints"

    @staticmethod
    def data(name: str) -> str:
        return f"{Artifact.DATA}/{name}"

    @staticmethod
    def result(name: str) -> str:
        return f"{Artifact.RESULTS}/{name}"

    @staticmethod
    def validation(checkpoint: str, file: str | None = None) -> str:
        """The folder of the held-out scores of checkpoint ``checkpoint``, or one ``file`` in it."""
        folder = f"{Artifact.VALIDATION}/{checkpoint}"
        return f"{folder}/{file}" if file else folder

    @staticmethod
    def checkpoint(name: str, file: str | None = None) -> str:
        """The folder of checkpoint ``name``, or one ``file`` in it."""
        folder = f"{Artifact.CHECKPOINTS}/{name}"
        return f"{folder}/{file}" if file else folder


# ------------------------------------------------------------------------------------------ manifest

# save_checkpoint writes it; manifests without one were written before it existed and read the same.
MANIFEST_VERSION = 1
# Fields written even when empty (null): every manifest since the first has them.
_ALWAYS_WRITTEN = ("stage", "epoch", "loop")


@dataclass
class Manifest:
    """A checkpoint's ``manifest.json``: what rebuilding and scoring the model needs without a store.

    Field names are the JSON keys. A training job fills the first group; ``save_checkpoint`` adds the
    format version and optimiser metadata; an exported model folder adds the last group."""

    stage: str | None = None  # a CheckpointStage value
    epoch: int | None = None
    loop: int | None = None  # feedback checkpoints: the loop
    fidelity: str | None = None
    backbone: str | None = None  # backbone id (model name and pretrained tag)
    cross_attention: bool | None = None  # whether the model has cross-attention modules
    modes: dict[str, Any] | None = None  # ModelModes.as_dict(): cross-attention switches, context source
    recipe: dict[str, Any] | None = None  # the recipe, as JSON
    prompt_names: dict[str, Any] | None = None  # {"table", "dataset", "names": {class: name}}
    text_epoch: int | None = None  # when the text side trained for another number of epochs
    image_epoch: int | None = None
    val: dict[str, float | None] | None = None  # feedback loop_<k>_stage_2: held-out validation means
    imported: dict[str, Any] | None = None  # an imported run's provenance
    format_version: int | None = None
    optimizers: dict[str, Any] | None = None  # optimiser metadata, by name (the tensors are files)
    # A model folder (aaclip export --format aaclip)
    format: str | None = None
    source: dict[str, Any] | None = None  # {"run_id", "checkpoint"}
    calibrations: list[dict[str, Any]] | None = None
    training_classes: list[str] | None = None
    # Keys this version does not know, kept as they are so that rewriting a manifest loses nothing.
    others: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: unset fields are left out (as the writers always did), stages as plain strings.
        A manifest read with :func:`read_manifest` comes back with the same keys and values."""
        out = {k: v for k, v in asdict(self).items() if k != "others" and (v is not None or k in _ALWAYS_WRITTEN)}
        if self.stage is not None:
            out["stage"] = str(self.stage)
        return {**out, **self.others}

    def model_modes(self) -> dict[str, Any]:
        """The model's modes (``ModelModes.as_dict()``). Manifests written before ``modes`` existed
        recorded ``cross_attention_on`` and ``context_source``, the switches following
        ``cross_attention`` when absent."""
        if isinstance(self.modes, dict):
            return {"text_cross": bool(self.modes.get("text_cross")), "image_cross": bool(self.modes.get("image_cross")),
                    "context_source": str(self.modes.get("context_source", "dpam"))}
        present = bool(self.cross_attention)
        switches = self.others.get("cross_attention_on") or {"text": present, "image": present}
        return {"text_cross": bool(switches["text"]), "image_cross": bool(switches["image"]),
                "context_source": str(self.others.get("context_source") or "dpam")}


_FIELDS = frozenset(f.name for f in fields(Manifest)) - {"others"}


def read_manifest(raw: Mapping[str, Any] | Manifest) -> Manifest:
    """The manifest a checkpoint's ``manifest.json`` holds, whichever aaclip version wrote it: keys
    this version does not name (older manifests' mode keys, say) are kept in ``others``, so that
    ``read_manifest(d).as_dict() == d`` for what any version wrote."""
    if isinstance(raw, Manifest):
        return raw
    return Manifest(**{k: v for k, v in raw.items() if k in _FIELDS},
                    others={k: v for k, v in raw.items() if k not in _FIELDS})
