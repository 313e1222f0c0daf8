"""From a stored run to a working model: the run's recipe, one of its checkpoints, the model rebuilt
from both, its tests' calibrations and a feedback run's per-loop validation. It sits below the jobs
so that `predict`, `doctor` and `compare` load models without reaching up into the job package.
The tracking store only stores and finds these; a model folder needs none (:mod:`.model_folder`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from aaclip_core.checkpoints.checkpoint import (
    CHECKPOINT_CORE_FILES,
    FINAL,
    MANIFEST,
    Checkpoint,
    checkpoint_name,
    load_checkpoint,
    parse_checkpoint_name,
)
from aaclip_core.checkpoints.model_folder import model_from_checkpoint  # noqa: F401 - model_from_checkpoint re-exported
from aaclip_core.errors import CheckpointError
from aaclip_core.evaluation.calibration import Calibration, choose_calibration
from aaclip_core.evaluation.selection import select_loop
from aaclip_core.model import AACLIP
from aaclip_core.model.backbone import backbone_id
from aaclip_core.names import PIXEL_AUROC
from aaclip_core.recipe import Recipe, recipe_from_dict
from aaclip_core.record import Artifact, CheckpointStage, Manifest, Stage, Tag, read_manifest
from aaclip_core.registry.tracking import download, get_run, list_artifacts

MAX_TEST_RUNS = 50


def manifest(recipe: Recipe, model: AACLIP, stage: CheckpointStage, epoch: int | None, loop: int | None = None, *,
             prompt_names: dict, **extra) -> dict:
    """What a checkpoint's manifest records about the model it holds, in its JSON form. ``prompt_names``:
    the names its text side was trained with (``AnchorBank.record()``), which evaluation keeps using;
    ``extra``: further :class:`~aaclip_core.record.Manifest` fields (``text_epoch``, ``val``, ...)."""
    return Manifest(
        stage=stage,
        epoch=epoch,
        loop=loop,
        fidelity=recipe.fidelity,
        backbone=backbone_id(recipe),
        cross_attention=model.text_cross_attn is not None,
        modes=model.modes.as_dict(),
        recipe=recipe.model_dump(mode="json"),
        prompt_names=prompt_names,
        **extra,
    ).as_dict()


def load_adapters(model: AACLIP, state: dict[str, torch.Tensor]) -> None:
    """Load a (possibly partial) adapter state: keys it lacks, e.g. fresh cross-attention modules,
    keep their current values; keys or shapes the model lacks are refused."""
    current = model.adapter_state_dict()
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise CheckpointError(f"Checkpoint has keys this model lacks: {', '.join(unknown[:3])}.")
    current.update({k: v.to(current[k].device) for k, v in state.items()})
    try:
        model.load_adapter_state_dict(current)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint does not fit the model: {exc}.") from None


# ------------------------------------------------------------------------------------------ from a run


def run_recipe(mlflow, run_id: str, workdir: Path) -> Recipe:
    run_id = get_run(mlflow, run_id).info.run_id  # the full id, when given a prefix
    path = download(mlflow, run_id, Artifact.RECIPE, workdir / run_id)
    return recipe_from_dict(json.loads(path.read_text(encoding="utf-8")), f"of run {run_id}")


def run_checkpoint(mlflow, run_id: str, name: str, workdir: Path, with_optimizer: bool = False) -> Checkpoint:
    """A run's checkpoint, downloaded. Only the adapters and the manifest unless the optimiser and
    random states are wanted (resume): from a server those are most of the bytes, and evaluating
    or starting from a checkpoint never reads them."""
    dst = workdir / run_id / "ckpt"
    if with_optimizer:
        local = download(mlflow, run_id, Artifact.checkpoint(name), dst)
    else:
        for file in CHECKPOINT_CORE_FILES:
            local = download(mlflow, run_id, Artifact.checkpoint(name, file), dst).parent
    return load_checkpoint(local, with_optimizer=with_optimizer)


def default_checkpoint(mlflow, run_id: str) -> str:
    """The checkpoint a run declares as its result. A feedback run: its held-out selected loop, or,
    when it ended before selecting (interrupted), the selection over the loops it finished."""
    run = get_run(mlflow, run_id)
    tags = run.data.tags
    if Tag.SELECTED_CHECKPOINT in tags or tags.get(Tag.STAGE) != Stage.FEEDBACK:
        return tags.get(Tag.SELECTED_CHECKPOINT, FINAL)
    with tempfile.TemporaryDirectory(prefix="aaclip-select-") as tmp:
        val = loop_validation(mlflow, run_id, Path(tmp))
    if not val:
        raise CheckpointError(f"Feedback run {run_id} finished no loop: it has no checkpoint to use. Resume it with "
                              f"`aaclip train feedback --resume {run_id}`.")
    metric = run.data.params.get("feedback.selection_metric", PIXEL_AUROC)
    return checkpoint_name(select_loop(val, metric).loop, 2)


def loop_validation(mlflow, run_id: str, workdir: Path) -> dict[int, dict[str, float]]:
    """loop -> the held-out validation results a feedback run kept with each loop's final
    (``loop_<k>_stage_2``) checkpoint; only the manifests are downloaded."""
    out: dict[int, dict[str, float]] = {}
    for path in list_artifacts(mlflow, run_id, Artifact.CHECKPOINTS):
        parsed = parse_checkpoint_name(Path(path).name)
        if parsed is None or parsed[1] != 2:
            continue
        local = download(mlflow, run_id, f"{path}/{MANIFEST}", workdir / run_id / Path(path).name)
        val = read_manifest(json.loads(local.read_text(encoding="utf-8"))).val
        if isinstance(val, dict):
            out[parsed[0]] = {k: float(v) for k, v in val.items() if v is not None}
    return out


# ------------------------------------------------------------------------------------------ its tests


def finished_tests(mlflow, run_id: str, checkpoint: str | None) -> list:
    """Finished test runs of ``run_id`` (at ``checkpoint`` when given), newest first."""
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    filt = f"tags.\"{Tag.SOURCE_RUN}\" = '{run_id}' and attributes.status = 'FINISHED'"
    if checkpoint is not None:
        filt += f" and tags.\"{Tag.CHECKPOINT}\" = '{checkpoint}'"
    return client.search_runs(experiments, filt, order_by=["attributes.start_time DESC"], max_results=MAX_TEST_RUNS)


def _has_artifact(mlflow, run_id: str, folder: str, name: str) -> bool:
    return f"{folder}/{name}" in list_artifacts(mlflow, run_id, folder)


def run_calibrations(mlflow, run_id: str, checkpoint: str, workdir: Path) -> tuple[list[Calibration], str | None]:
    """The calibrations of the finished test runs of ``run_id`` at ``checkpoint``, newest first, and
    a note when there are none (or only test runs of another checkpoint). Test runs older than the
    calibration report are skipped; a store that cannot be read is an error, not "no test run"."""
    out = []
    for run in finished_tests(mlflow, run_id, checkpoint):
        tid = run.info.run_id
        if not _has_artifact(mlflow, tid, Artifact.RESULTS, Artifact.REPORT):
            continue
        report = json.loads(download(mlflow, tid, Artifact.result(Artifact.REPORT), workdir / "calibration" / tid)
                            .read_text(encoding="utf-8"))
        cal = Calibration.from_dict({
            "dataset": run.data.tags.get(Tag.DATASET, "?"),
            "test_run_id": tid,
            "checkpoint": checkpoint,
            "training_data": run.data.tags.get(Tag.TRAINING_DATA, run.data.tags.get(Tag.SAME_DATASET)) == "true",
            "classes": report.get("calibration") or {},
        })
        if cal.classes:
            cal.prompt_names = _test_prompt_names(mlflow, tid, workdir)
            out.append(cal)
    if out:
        return out, None
    others = finished_tests(mlflow, run_id, None)
    if others:
        ck = sorted({r.data.tags.get(Tag.CHECKPOINT, "?") for r in others})
        return [], f"run {run_id} has finished test runs only of checkpoint(s) {', '.join(ck)}, not '{checkpoint}'"
    return [], f"run {run_id} has no finished test run"


def _test_prompt_names(mlflow, test_run_id: str, workdir: Path) -> dict[str, str]:
    """class -> the prompt name a test run used; empty for a test run from before names were logged."""
    if not _has_artifact(mlflow, test_run_id, *Artifact.PROMPT_NAMES.rsplit("/", 1)):
        return {}
    path = download(mlflow, test_run_id, Artifact.PROMPT_NAMES, workdir / "calibration" / test_run_id)
    classes = json.loads(path.read_text(encoding="utf-8")).get("classes", {})
    return {c: v["name"] for c, v in classes.items()}


def chosen_calibration(mlflow, run_id: str, checkpoint: str, workdir: Path, wanted: str | None = None,
                       classes: set[str] | None = None) -> tuple[Calibration | None, str | None]:
    """The calibration of the run's tests at ``checkpoint`` that the one rule
    (:func:`~aaclip_core.evaluation.calibration.choose_calibration`) picks, or None and why."""
    calibrations, note = run_calibrations(mlflow, run_id, checkpoint, workdir)
    choice = choose_calibration(calibrations, classes or set(), wanted)
    return choice.calibration, note or choice.note


def training_classes(mlflow, run_id: str, recipe: Recipe, workdir: Path) -> set[str]:
    """Classes the run was trained on (its logged sample list), else those its recipe names."""
    if not _has_artifact(mlflow, run_id, Artifact.DATA, Artifact.TRAIN_SAMPLES):
        return set(recipe.data.train.classes or [])
    path = download(mlflow, run_id, Artifact.data(Artifact.TRAIN_SAMPLES), workdir / "train-meta")
    return {json.loads(line)["class_name"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
