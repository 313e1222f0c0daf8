"""`aaclip test`: the reference protocol on one declared checkpoint of a run (SPEC §5)."""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .. import distributed
from ..config import DatasetRef, Recipe, apply_overrides, flatten, recipe_from_dict
from ..data.prompt_names import checkpoint_namer
from ..errors import ConfigError
from ..evaluation import METRIC_NAMES, evaluate
from ..pixel_pairs import save_pixel_pairs
from ..tracking import TAG, connect, get_run, log_json_artifact, tracked_run
from ..training.data import load_samples, make_dataset, make_loader
from . import common
from ..reporter import Reporter


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


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def test_run(
    run_id: str,
    dataset: str | None = None,
    data_root: str | None = None,
    layout: str | None = None,
    checkpoint: str | None = None,
    same_dataset: bool = False,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    overrides: list[str] | None = None,
    visualize: int = 0,
) -> dict:
    mlflow = connect(tracking_uri, write=True)
    source = get_run(mlflow, run_id)
    run_id = source.info.run_id  # the full id, when given a prefix
    if source.data.tags.get(f"{TAG}stage") == "test":
        trained = source.data.tags.get(f"{TAG}source_run", "unknown")
        raise ConfigError(
            f"Run {run_id} is a test run (it evaluated the training run {trained}); `test --run` takes a training "
            f"run. Pass --run {trained} to evaluate that run again."
        )
    with tempfile.TemporaryDirectory(prefix="aaclip-test-") as tmp:
        workdir = Path(tmp)
        recipe = common.run_recipe(mlflow, run_id, workdir)
        if overrides:
            recipe = recipe_from_dict(apply_overrides(recipe.model_dump(mode="json"), overrides), "with --set")
        ref = test_dataset(recipe, dataset, data_root, layout)
        reason = same_dataset_reason(recipe, ref)
        same = reason is not None
        declared_by = same_dataset_declaration(recipe, ref, same_dataset) if same else None
        if same and declared_by is None:
            raise ConfigError(
                f"Run {run_id} was trained on '{recipe.data.train.name}' at {recipe.data.train.root} and would be "
                f"tested on the same data: {reason}. The zero-shot protocol does not allow that. Test on another "
                "dataset (--dataset NAME --data-root DIR) or say so explicitly with --same-dataset (the test run "
                "is tagged aaclip.same_dataset=true and `compare` marks it)."
            )
        session = common.open_session(recipe, None, tracking_uri, reporter)
        try:
            ckpt_name = checkpoint or common.default_checkpoint(mlflow, run_id)
            ckpt = common.run_checkpoint(mlflow, run_id, ckpt_name, workdir)
            model = common.model_from_checkpoint(recipe, ckpt, session.device)
            samples = load_samples(ref, recipe.runtime.seed, field="data.test")
            session.reporter.info(
                f"testing run {run_id} checkpoint '{ckpt_name}' (stage {ckpt.manifest.get('stage')}, "
                f"epoch {ckpt.manifest.get('epoch')}, loop {ckpt.manifest.get('loop')}) on {ref.name}: "
                f"{len(samples)} images"
            )
            bank = common.anchor_bank(model, samples, checkpoint_namer(recipe, ref, ckpt.manifest))
            loader = make_loader(make_dataset(samples, recipe, "none"), recipe.eval.batch_size, False, recipe, None)
            tags = common.run_tags(recipe, "test", ref.name)
            tags.update(
                {
                    f"{TAG}source_run": run_id,
                    f"{TAG}source_stage": source.data.tags.get(f"{TAG}stage", "unknown"),
                    f"{TAG}checkpoint": ckpt_name,
                    f"{TAG}train_dataset": recipe.data.train.name,
                    f"{TAG}same_dataset": str(same).lower(),
                    **({f"{TAG}same_dataset_declared_by": declared_by} if same else {}),
                    "mlflow.parentRunId": run_id,
                }
            )
            started = time.perf_counter()
            with tracked_run(mlflow, recipe.tracking.experiment, f"test-{ref.name}-{run_id[:8]}", tags) as run:
                report = evaluate(model, bank, loader, recipe, session.device,
                                  sample_paths=[str(s.image_path) for s in samples],
                                  progress=session.reporter.eval_progress)
                seconds = time.perf_counter() - started
                if report is None:  # a rank other than 0 under torchrun: rank 0 logs the whole test
                    return {"run_id": run.info.run_id, "source_run_id": run_id, "checkpoint": ckpt_name,
                            "rank": distributed.rank()}
                metrics = {k: v for k, v in report.mean.items() if not math.isnan(v)}
                for r in report.classes:
                    for m in METRIC_NAMES:
                        v = getattr(r, m)
                        if not math.isnan(v):
                            metrics[f"{r.class_name}/{m}"] = v
                metrics["eval_seconds"] = seconds
                mlflow.log_metrics(metrics)
                mlflow.log_params({"test.dataset": ref.name, "test.root": ref.root, "test.checkpoint": ckpt_name})
                common.log_prompt_names(mlflow, bank)
                # The protocol settings this test ran with (the run's recipe after --set), for `compare`.
                mlflow.log_params({f"protocol.{k}": v for k, v in flatten(recipe).items()
                                   if k.startswith("eval.") or k == "data.domain"})
                mlflow.log_text(_csv([asdict(r) for r in report.classes]), "results/per_class.csv")
                mlflow.log_text(_csv(report.image_scores), "results/image_scores.csv")
                log_json_artifact(mlflow, report.as_dict(), "results/report.json")
                if report.pixel_pairs:
                    pairs_file = workdir / "pixel_pairs.npz"
                    save_pixel_pairs(pairs_file, report.pixel_pairs)
                    mlflow.log_artifact(str(pairs_file), "results")
                visualizations = []
                if visualize > 0:  # `--visualize N`: anomaly-map pictures under visualizations/<class>/
                    from ..visualize import log_test_visualizations

                    visualizations = log_test_visualizations(mlflow, model, bank, recipe, session.device, samples,
                                                             report, visualize)
                return {
                    "run_id": run.info.run_id,
                    "source_run_id": run_id,
                    "checkpoint": ckpt_name,
                    "checkpoint_stage": ckpt.manifest.get("stage"),
                    "checkpoint_epoch": ckpt.manifest.get("epoch"),
                    "checkpoint_loop": ckpt.manifest.get("loop"),
                    "dataset": ref.name,
                    "same_dataset": same,
                    "same_dataset_reason": reason,
                    "same_dataset_declared_by": declared_by,
                    "eval_seconds": seconds,
                    "visualizations": visualizations,
                    **report.as_dict(),
                }
        finally:
            session.close()
