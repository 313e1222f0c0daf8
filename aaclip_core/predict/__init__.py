"""`aaclip predict`: score new images with a trained model, on the scale `aaclip test` reports.

Model. A run of the tracking store (``run_id``, at its selected or a named checkpoint) or a model
folder (``model_dir``, no store needed; see :mod:`aaclip_core.checkpoints.model_folder`).

Scale. `test` min-max normalises raw pixel maps and detection scores over each class's test set
and keeps the ranges and the F1-optimal image threshold as a calibration (:mod:`aaclip_core.evaluation.calibration`).
A new image is scored with the calibration of a test on the images' own dataset, which reproduces
that test's image score exactly. Which test that is must be unambiguous
(:func:`~aaclip_core.evaluation.calibration.choose_calibration`): the one test dataset whose calibration covers
the images' classes, never a test on the model's training data; ``--calibration`` names a test run
or dataset when it is not. Without a calibration the score is the same formula on the raw values
(not on the test scale); the overlay's heat map is then normalised by the image's own map.

Threshold. A number is used as is ("user"); ``auto`` takes each class's F1-optimal threshold of the
calibration and stops with a message when no calibration can be chosen; no threshold means ``auto``
when a calibration is chosen and no verdict otherwise. Verdict: anomalous when score >= threshold.

Class of an image, per image: where it sits in an indexed layout (MVTec AD / MPDD / BTAD
``<class>/test/<defect>/x``, VisA ``<class>/Data/Images/Anomaly/x``, the plain ``<class>/normal/x``),
else the nearest of its parent, grandparent and great-grandparent folders that is a known class of
the model (its calibrations' and training classes), else ``class_name`` (``--class``); else the image
gets an error row. A folder of several classes is one call. Folders are searched recursively,
skipping mask folders (``ground_truth``, VisA ``Masks``, ``masks``), hidden entries and the output folder. Preprocessing is `load_image_tensor` (as `test`), and every image is scored
independently, so results do not depend on the batch size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from aaclip_score.inputs import (
    CLASS_SEARCH_DEPTH,
    ROW_KEYS,
    SKIP_DIRS,
    ImageJob,
    assign_classes,
    collect_images,
    resolve_class,
)
from aaclip_score.outputs import (
    PREDICTIONS_FILE,
    ImageOutputs,
    Thresholds,
    check_out_dir,
    parse_threshold,
    write_summary,
)

from aaclip_core.errors import ConfigError

if TYPE_CHECKING:  # the model-side modules load only where a model is scored
    from aaclip_core.evaluation.calibration import Calibration
    from aaclip_core.predict.source import ModelSource
    from aaclip_core.reporter import Reporter

__all__ = [
    "CLASS_SEARCH_DEPTH", "PREDICTIONS_FILE", "ROW_KEYS", "SKIP_DIRS", "ImageJob", "ImageOutputs", "ModelSource",
    "Thresholds", "collect_images", "parse_threshold", "predict_images", "resolve_class", "score_image",
    "run_calibrations", "write_summary",
]



def _load_source(run_id: str | None, model_dir: Path | None, checkpoint: str | None, tracking_uri: str | None,
                 workdir: Path) -> tuple[ModelSource, str | None]:
    from aaclip_core.predict.source import from_folder, from_run

    if (run_id is None) == (model_dir is None):
        raise ConfigError("predict needs a model: pass either --run RUN_ID or --model DIR|FILE (not both).")
    if model_dir is not None:
        if checkpoint is not None:
            raise ConfigError("--checkpoint picks a checkpoint of a run; a model folder holds one model (drop it).")
        source = from_folder(model_dir)
        return source, None if source.calibrations else f"the {source.label} holds no calibration"
    from aaclip_core.registry.tracking import connect

    return from_run(connect(tracking_uri), run_id, checkpoint, workdir)


def _calibration(source: ModelSource, classes: set[str], wanted: str | None, mode, store_note: str | None,
                 class_name: str | None) -> tuple[Calibration | None, str | None]:
    """The calibration to score with and, when there is none, why; ``auto`` without one stops here."""
    from aaclip_core.evaluation.calibration import choose_calibration

    choice = choose_calibration(source.calibrations, classes, wanted)
    note = store_note or choice.note
    if choice.calibration is None:
        if mode == "auto" and not source.calibrations:
            raise ConfigError(
                f"--threshold auto takes the F1-optimal threshold of a test of the {source.label}, but {note}. "
                f"Run `{source.calibrate_hint}` first, or pass a numeric --threshold."
            )
        if mode == "auto" or wanted:
            raise ConfigError(f"Cannot choose a calibration for the {source.label}: {note}.")
        return None, f"{note}: scores are raw, not on the test scale (calibrate with `{source.calibrate_hint}`)"
    cal = choice.calibration
    if mode == "auto" and class_name and cal.threshold(class_name) is None:
        raise ConfigError(
            f"--threshold auto: {cal.label} has no F1-optimal threshold for class '{class_name}' "
            f"(it has: {', '.join(sorted(cal.classes)) or 'none'}). Pass a numeric --threshold."
        )
    return cal, None


def predict_images(
    run_id: str | None,
    inputs: list[Path],
    out_dir: Path | None = None,
    threshold: str | float | None = None,
    class_name: str | None = None,
    checkpoint: str | None = None,
    save_maps: bool = False,
    batch_size: int | None = None,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    contour_level: float = 0.5,
    model_dir: Path | None = None,
    calibration: str | None = None,
) -> dict:
    """Score images with a run's model or a model folder; write overlays (and raw maps) and
    ``predictions.jsonl`` under ``out_dir``. Returns a summary with every row; unreadable images are
    rows with an ``error``."""
    from aaclip_core.compute import configure_threads, seed_everything, select_device
    from aaclip_core.predict.scoring import BatchScorer
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.prompts.names import scoring_namer
    from aaclip_core.reporter import Reporter

    reporter = reporter or Reporter()
    mode = parse_threshold(threshold)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    if out_dir is not None:  # before the model is loaded
        check_out_dir(Path(out_dir))
    with tempfile.TemporaryDirectory(prefix="aaclip-predict-") as tmp:
        source, store_note = _load_source(run_id, model_dir, checkpoint, tracking_uri, Path(tmp))
    name = (source.run_id or Path(model_dir).name)[:8]
    out_dir = Path(out_dir) if out_dir is not None else Path(f"aaclip-predict-{name}")
    check_out_dir(out_dir)
    jobs = collect_images(list(inputs), out_dir)
    classes = assign_classes(jobs, class_name, source.known_classes)
    cal, note = _calibration(source, classes, calibration, mode, store_note, class_name)
    if mode is None and cal is not None:
        mode = "auto"

    recipe = source.recipe
    configure_threads(recipe.runtime.threads)
    seed_everything(recipe.runtime.seed)
    device = select_device(recipe.runtime.device)
    model = _model(source, device)
    # The calibrating test's own class set and prompt names, so the anchors are exactly as in `test`.
    bank_classes = sorted(classes | set(cal.classes if cal else ()))
    names = scoring_namer(recipe, cal.dataset if cal else recipe.data.test.name, source.checkpoint.manifest,
                          cal and cal.prompt_names)
    bank = AnchorBank(model, bank_classes, names) if bank_classes else None
    if bank is not None:
        bank.freeze()
    reporter.info(f"predicting {len(jobs)} images with the {source.label}"
                  + (f", calibrated by {cal.label}" if cal else ""))
    outputs = ImageOutputs(out_dir, Thresholds(mode, cal), save_maps, contour_level)
    rows = BatchScorer(model, bank, recipe, device, outputs).run(jobs, batch_size or recipe.eval.batch_size,
                                                                 reporter.eval_progress)
    head = {"run_id": source.run_id, "model": source.label, "checkpoint": source.checkpoint_name}
    return write_summary(head, cal, note, mode, out_dir, rows)


def _model(source: ModelSource, device):
    from aaclip_core.checkpoints.model_folder import model_from_checkpoint

    model = model_from_checkpoint(source.recipe, source.checkpoint, device)
    model.eval()
    return model


def __getattr__(name: str):
    """The model-side names, loaded on first use (see the imports above)."""
    if name in ("BatchScorer", "score_image"):
        from aaclip_core.predict import scoring

        return getattr(scoring, name)
    if name in ("ModelSource", "from_folder", "from_run", "run_calibrations"):
        from aaclip_core.predict import source

        return getattr(source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
