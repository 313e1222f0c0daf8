"""`aaclip test`: the reference protocol on one declared checkpoint of a run, or on a model folder
with no tracking store (SPEC §5).

A run's test is an MLflow run (tags ``aaclip.source_run`` / ``aaclip.checkpoint``) holding the
metrics, per-image scores, pixel pairs and the calibration (``results/report.json``). A model
folder's test records its calibration in the folder itself (see :mod:`aaclip_core.checkpoints.model_folder`).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aaclip_core import distributed
from aaclip_core.checkpoints.checkpoint import Checkpoint
from aaclip_core.checkpoints.model_folder import add_calibration, read_model_folder
from aaclip_core.errors import ConfigError
from aaclip_core.evaluation.calibration import Calibration, ClassCalibration
from aaclip_core.evaluation.protocol import METRIC_NAMES, EvalReport, evaluate
from aaclip_core.jobs import common
from aaclip_core.prompts.names import checkpoint_namer
from aaclip_core.recipe import DatasetRef, Recipe, apply_overrides, flatten, recipe_from_dict
from aaclip_core.record import Artifact, Stage, Tag
from aaclip_core.registry.tracking import connect, get_run, log_json_artifact, tracked_run
from aaclip_core.reporter import Reporter
from aaclip_core.training.data import load_samples, make_dataset, make_loader


def test_dataset(recipe: Recipe, dataset: str | None, data_root: str | None, layout: str | None) -> DatasetRef:
    if data_root and not dataset:
        raise ConfigError(
            f"--data-root {data_root} needs --dataset NAME too (e.g. MVTec, VisA): the name selects the "
            "prompt-name table and is what the zero-shot check and the run's tags use."
        )
    ref = recipe.data.test.model_copy()
    updates = {}
    if dataset:
        updates["name"] = dataset
    if data_root:
        updates["root"] = data_root
        updates["layout"] = layout or "auto"
    elif layout:
        updates["layout"] = layout
    return ref.model_copy(update=updates)


def same_dataset_reason(recipe: Recipe, ref: DatasetRef) -> str | None:
    """Why testing on ``ref`` would test on the training data, or None when it would not.

    The same folder under any name is the same data; so is the same name in another folder (a copy
    of the dataset). The demo's two halves are the exception: ``synthetic`` train/ and test/ are
    independent renders, not the same images.
    """
    train = recipe.data.train
    train_root = Path(train.root).expanduser().resolve()
    test_root = Path(ref.root).expanduser().resolve()
    if train_root == test_root:
        return f"the test root {test_root} is the training root (data.train.root)"
    if train.layout == ref.layout == "synthetic" and train_root.name != test_root.name:
        return None
    if ref.name.lower() == train.name.lower():
        return (f"the test dataset has the training dataset's name '{ref.name}' (data.train.name; set the "
                "test's name with --dataset if it is another dataset)")
    return None


def same_dataset_declaration(recipe: Recipe, ref: DatasetRef, flag: bool) -> str | None:
    """Who declared a same-dataset test: the ``--same-dataset`` flag, or the recipe's
    ``data.allow_same_dataset``, which covers only the test data that recipe names (data.test), so a
    declaration never carries over to other data pointed at with --data-root or --set."""
    if flag:
        return "--same-dataset"
    declared = recipe.data.test
    same_data = (
        Path(declared.root).expanduser().resolve() == Path(ref.root).expanduser().resolve()
        and declared.name.lower() == ref.name.lower()
    )
    if recipe.data.allow_same_dataset and same_data:
        return f"data.allow_same_dataset of the run's recipe, for {declared.name} at {declared.root}"
    return None


# Recipe settings that change a test's numbers besides the eval.* ones (image size, backbone, fidelity).
PROTOCOL_KEYS = ("data.domain", "fidelity", "model.name", "model.pretrained", "model.image_size")


def test_protocol(recipe: Recipe) -> dict[str, str]:
    """The settings a test ran with (its model's recipe after --set), logged as ``protocol.*`` params so
    that `compare` judges each test by its own protocol: eval.*, prompt names (prompts.*), the keys
    above and the activation actually used (QuickGELU, resolved from fidelity and weights)."""
    flat = flatten(recipe)
    out = {k: v for k, v in flat.items() if k.startswith(("eval.", "prompts.")) or k in PROTOCOL_KEYS}
    out["model.quick_gelu"] = str(recipe.quick_gelu).lower()
    return out


@dataclass
class _Subject:
    """What is tested: the model's recipe (after --set), its checkpoint and where it came from."""

    recipe: Recipe
    checkpoint: Checkpoint
    checkpoint_name: str
    run_id: str | None = None
    source_stage: str = "unknown"
    folder: Path | None = None


def _subject(run_id, model_dir, checkpoint, tracking_uri, overrides, workdir: Path) -> tuple[_Subject, object]:
    if (run_id is None) == (model_dir is None):
        raise ConfigError("test needs a model: pass either --run RUN_ID or --model DIR (not both).")
    mlflow = None
    if model_dir is not None:
        if checkpoint is not None:
            raise ConfigError("--checkpoint / --loop pick a checkpoint of a run; a model folder holds one model.")
        folder = read_model_folder(model_dir)
        name = folder.source["checkpoint"] or str(folder.manifest.stage)
        subject = _Subject(folder.recipe, folder.checkpoint, name, folder.source["run_id"], folder=folder.path)
    else:
        mlflow = connect(tracking_uri, write=True)
        source = get_run(mlflow, run_id)
        run_id = source.info.run_id  # the full id, when given a prefix
        if source.data.tags.get(Tag.STAGE) == Stage.TEST:
            trained = source.data.tags.get(Tag.SOURCE_RUN, "unknown")
            raise ConfigError(
                f"Run {run_id} is a test run (it evaluated the training run {trained}); `test --run` takes a "
                f"training run. Pass --run {trained} to evaluate that run again."
            )
        if source.data.tags.get(Tag.STAGE) == Stage.SWEEP:
            source, run_id = _best_trial(mlflow, source)
        name = checkpoint or common.default_checkpoint(mlflow, run_id)
        subject = _Subject(common.run_recipe(mlflow, run_id, workdir), common.run_checkpoint(mlflow, run_id, name, workdir),
                           name, run_id, source.data.tags.get(Tag.STAGE, "unknown"))
    if overrides:
        subject.recipe = recipe_from_dict(apply_overrides(subject.recipe.model_dump(mode="json"), overrides),
                                          "with --set")
    return subject, mlflow


def _best_trial(mlflow, sweep):
    """A sweep stands for its best trial (the training run `aaclip sweep` tagged on it)."""
    best = sweep.data.tags.get(Tag.BEST_RUN)
    if best is None:
        raise ConfigError(
            f"Sweep {sweep.info.run_id} has no finished trial yet, so it has no best trial to test. Let the sweep "
            "finish (`aaclip sweep --study NAME` joins it), or test one of its trial runs (`aaclip runs`)."
        )
    run = get_run(mlflow, best)
    return run, run.info.run_id


@dataclass
class _SameDataset:
    """Whether a test runs on its model's training data (judged on the data), why, and who declared it."""

    reason: str | None
    declared_by: str | None

    @property
    def same(self) -> bool:
        return self.reason is not None


def _check_dataset(subject: _Subject, ref: DatasetRef, same_dataset: bool) -> _SameDataset:
    """A test on the training data must be declared (--same-dataset or the recipe's
    data.allow_same_dataset for its own data.test); otherwise it is refused."""
    recipe = subject.recipe
    reason = same_dataset_reason(recipe, ref)
    declared_by = same_dataset_declaration(recipe, ref, same_dataset) if reason is not None else None
    if reason is not None and declared_by is None:
        who = f"Run {subject.run_id}" if subject.folder is None else f"The model in {subject.folder}"
        raise ConfigError(
            f"{who} was trained on '{recipe.data.train.name}' at {recipe.data.train.root} and would be "
            f"tested on the same data: {reason}. The zero-shot protocol does not allow that. Test on another "
            "dataset (--dataset NAME --data-root DIR) or say so explicitly with --same-dataset (the test run "
            f"is tagged {Tag.SAME_DATASET}=true and `compare` marks it)."
        )
    return _SameDataset(reason, declared_by)


def _log_test(mlflow, run_id: str, report: EvalReport, ref: DatasetRef, subject: _Subject, seconds: float,
              workdir: Path) -> None:
    """Everything a test run keeps: metrics (mean and per class), protocol, per-class and per-image
    results, the calibration report and the pixel pairs."""
    metrics = {k: v for k, v in report.mean.items() if not math.isnan(v)}
    for r in report.classes:
        for m in METRIC_NAMES:
            v = getattr(r, m)
            if not math.isnan(v):
                metrics[f"{r.class_name}/{m}"] = v
    metrics["eval_seconds"] = seconds
    mlflow.log_metrics(metrics)
    mlflow.log_params({"test.dataset": ref.name, "test.root": ref.root, "test.checkpoint": subject.checkpoint_name})
    mlflow.log_params({f"protocol.{k}": v for k, v in test_protocol(subject.recipe).items()})
    mlflow.log_text(common.csv_text([asdict(r) for r in report.classes]), Artifact.result(Artifact.PER_CLASS))
    log_json_artifact(mlflow, report.as_dict(), Artifact.result(Artifact.REPORT))
    common.log_scores(mlflow, run_id, report, Artifact.RESULTS, workdir)


def test_run(
    run_id: str | None,
    dataset: str | None = None,
    data_root: str | None = None,
    layout: str | None = None,
    checkpoint: str | None = None,
    same_dataset: bool = False,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    overrides: list[str] | None = None,
    visualize: int = 0,
    model_dir: Path | None = None,
) -> dict:
    if model_dir is not None and visualize:
        raise ConfigError("--visualize logs pictures to the test run; a test of a model folder (--model) makes no "
                          "run. Use `aaclip predict --model DIR` on the images you want to see.")
    with tempfile.TemporaryDirectory(prefix="aaclip-test-") as tmp:
        workdir = Path(tmp)
        subject, mlflow = _subject(run_id, model_dir, checkpoint, tracking_uri, overrides, workdir)
        recipe = subject.recipe
        ref = test_dataset(recipe, dataset, data_root, layout)
        judged = _check_dataset(subject, ref, same_dataset)
        store = mlflow is not None
        with common.open_session(recipe, None, tracking_uri if store else None, reporter, store=store) as session:
            return _evaluate(session, subject, ref, mlflow, workdir, visualize, judged)


def _evaluate(session: common.Session, subject: _Subject, ref: DatasetRef, mlflow, workdir: Path, visualize: int,
              judged: _SameDataset) -> dict:
    recipe = subject.recipe
    model = common.model_from_checkpoint(recipe, subject.checkpoint, session.device)
    samples = load_samples(ref, recipe.runtime.seed, field="data.test")
    meta = subject.checkpoint.info
    what = f"run {subject.run_id}" if subject.folder is None else f"model folder {subject.folder}"
    session.reporter.info(
        f"testing {what} checkpoint '{subject.checkpoint_name}' (stage {meta.stage}, epoch "
        f"{meta.epoch}, loop {meta.loop}) on {ref.name}: {len(samples)} images"
    )
    bank = common.anchor_bank(model, samples, checkpoint_namer(recipe, ref, meta))
    loader = make_loader(make_dataset(samples, recipe, "none"), recipe.eval.batch_size, False, recipe, None)
    # Judged on the data: a test on the training data is never a calibration chosen automatically.
    same = training_data = judged.same
    result = {
        "run_id": None,
        "source_run_id": subject.run_id,
        "model_dir": str(subject.folder) if subject.folder else None,
        "checkpoint": subject.checkpoint_name,
        "checkpoint_stage": meta.stage,
        "checkpoint_epoch": meta.epoch,
        "checkpoint_loop": meta.loop,
        "dataset": ref.name,
        "same_dataset": same,
        "same_dataset_reason": judged.reason,
        "same_dataset_declared_by": judged.declared_by,
        "training_data": training_data,
        "visualizations": [],
    }
    started = time.perf_counter()

    def run_eval() -> EvalReport | None:
        return evaluate(model, bank, loader, recipe, session.device, sample_paths=[str(s.image_path) for s in samples],
                        progress=session.reporter.eval_progress)

    if mlflow is None:  # a model folder: no store; the calibration goes into the folder
        report = run_eval()
        if report is None:  # a rank other than 0 under torchrun: rank 0 writes the calibration
            return {**result, "rank": distributed.rank()}
        add_calibration(subject.folder, _calibration(report, ref, None, subject.checkpoint_name, training_data))
        return {**result, "eval_seconds": time.perf_counter() - started, **report.as_dict()}
    tags = common.run_tags(recipe, Stage.TEST, ref.name)
    tags.update({
        Tag.SOURCE_RUN: subject.run_id,
        Tag.SOURCE_STAGE: subject.source_stage,
        Tag.CHECKPOINT: subject.checkpoint_name,
        Tag.TRAIN_DATASET: recipe.data.train.name,
        Tag.SAME_DATASET: str(same).lower(),
        Tag.TRAINING_DATA: str(training_data).lower(),
        **({Tag.SAME_DATASET_DECLARED_BY: judged.declared_by} if same else {}),
        "mlflow.parentRunId": subject.run_id,
    })
    with tracked_run(mlflow, recipe.tracking.experiment, f"test-{ref.name}-{subject.run_id[:8]}", tags) as run:
        report = run_eval()
        seconds = time.perf_counter() - started
        if report is None:  # a rank other than 0 under torchrun: rank 0 logs the whole test
            return {**result, "run_id": run.info.run_id, "rank": distributed.rank()}
        _log_test(mlflow, run.info.run_id, report, ref, subject, seconds, workdir)
        common.log_prompt_names(mlflow, bank)
        if visualize > 0:  # `--visualize N`: anomaly-map pictures under visualizations/<class>/
            from aaclip_core.pictures.visualize import log_test_visualizations

            result["visualizations"] = log_test_visualizations(mlflow, model, bank, recipe, session.device, samples,
                                                               report, visualize)
        return {**result, "run_id": run.info.run_id, "eval_seconds": seconds, **report.as_dict()}


def _calibration(report: EvalReport, ref: DatasetRef, test_run_id: str | None, checkpoint: str,
                 training_data: bool) -> Calibration:
    return Calibration(ref.name, test_run_id, checkpoint, training_data,
                       {c: ClassCalibration.from_dict(v) for c, v in report.calibration.items()})
