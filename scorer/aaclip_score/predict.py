"""`aaclip predict --model FILE` and `aaclip-score`: score images with an exported detector alone,
writing what `predict --run` writes: overlays, optional raw maps, ``predictions.jsonl`` and the
summary, with the same rules for classes, thresholds and verdicts (see `aaclip_core.predict`).
ONNX here; `aaclip_core.deploy.predict` passes a loader that also runs TorchScript.

The scale is the exported calibration (the sidecar's ``calibration``, baked into the graph): a
calibrated class scores on its test run's scale and ``--threshold auto`` takes its F1-optimal
threshold; a class without calibration scores on the raw scale, where only a numeric threshold
gives a verdict, and its overlay's heat map is normalised by the image's own map.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from aaclip_score.batches import score_in_batches
from aaclip_score.calibration import Calibration
from aaclip_score.detector import Detector, load_detector
from aaclip_score.errors import ConfigError
from aaclip_score.inputs import ImageJob, assign_classes, collect_images
from aaclip_score.outputs import ImageOutputs, Thresholds, check_out_dir, parse_threshold, write_summary
from aaclip_score.postprocess import clip_for_display, display_map

DEFAULT_BATCH = 8


def _heat(raw_map: np.ndarray, nmap: np.ndarray, calibrated: bool) -> np.ndarray:
    """The overlay's heat map, as `predict.score_image` draws it: the graph's map is already on the
    calibration's scale; an uncalibrated class's map is shown on its own range."""
    if calibrated:
        return clip_for_display(nmap)
    return display_map(np.asarray(raw_map, dtype=np.float32))


def _calibration(detector: Detector) -> Calibration | None:
    source = detector.info.get("calibration_source")
    classes = detector.info.get("calibration") or {}
    if not source or not classes:
        return None
    checkpoint = (detector.info.get("provenance") or {}).get("checkpoint", "?")
    return Calibration.from_dict({**source, "checkpoint": checkpoint, "classes": classes})


def _check_threshold(model: Path, mode, calibration: Calibration | None, note: str | None,
                     class_name: str | None) -> None:
    """``auto`` needs the exported calibration, and a threshold in it for a class named by --class."""
    if mode == "auto" and calibration is None:
        raise ConfigError(
            f"--threshold auto takes the F1-optimal thresholds exported with the model, but {model} was exported "
            f"without calibration ({note or 'no test run'}). Test the run and export it again, or pass a numeric "
            "--threshold."
        )
    if mode == "auto" and class_name and calibration.threshold(class_name) is None:
        raise ConfigError(
            f"--threshold auto: {model} has no F1-optimal threshold for class '{class_name}' (it has: "
            f"{', '.join(sorted(calibration.classes)) or 'none'}). Pass a numeric --threshold."
        )


def _assign_classes(model: Path, detector: Detector, jobs: list[ImageJob], class_name: str | None) -> None:
    """Each job's class as `predict --run` finds it, restricted to the classes baked into the file."""
    known = set(detector.classes)
    if class_name and class_name not in known:
        raise ConfigError(
            f"--class {class_name}: {model} was exported for {', '.join(detector.classes)} only (the class's text "
            f"anchors are baked into the file). Export the run again with --class {class_name}."
        )
    assign_classes(jobs, class_name, known)
    for job in jobs:
        if job.error is None and job.class_name not in known:  # named by a dataset layout, not baked into the file
            job.error = (f"class '{job.class_name}' is not in {model} (it has: {', '.join(detector.classes)}); "
                         f"export the run again with --class {job.class_name}")


def _scorer(detector: Detector, outputs: ImageOutputs):
    """Scores a batch of (job, (input, picture)) with the file: its map and score are already on the
    exported calibration's scale."""

    def score(batch: list[tuple[ImageJob, tuple[np.ndarray, np.ndarray]]]) -> list[dict]:
        out = detector.score(np.stack([x for _, (x, _) in batch]), [job.class_name for job, _ in batch])
        rows = []
        for j, (job, (_, picture)) in enumerate(batch):
            raw_map = out["raw_map"][j]
            heat = _heat(raw_map, out["map"][j], outputs.thresholds.calibrated(job.class_name))
            rows.append(outputs.scored(job, picture, heat, raw_map, float(out["score"][j]), float(out["raw_det"][j])))
        return rows

    return score


def predict_with_file(
    model: Path,
    inputs: list[Path],
    out_dir: Path | None = None,
    threshold: str | float | None = None,
    class_name: str | None = None,
    save_maps: bool = False,
    batch_size: int | None = None,
    reporter=None,
    contour_level: float = 0.5,
    threads: int | None = None,
    load: Callable[[Path, int | None], Detector] = load_detector,
) -> dict:
    """Like `aaclip_core.predict.predict_images`, with an exported file in place of a run; ``load``
    opens the file (ONNX here, TorchScript too from `aaclip_core.deploy.predict`)."""
    thr = parse_threshold(threshold)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    if out_dir is not None:  # before the detector is loaded
        check_out_dir(Path(out_dir))
    detector = load(model, threads)
    provenance = detector.info.get("provenance") or {}
    out_dir = Path(out_dir) if out_dir is not None else Path(f"aaclip-predict-{Path(model).stem}")
    check_out_dir(out_dir)
    jobs = collect_images(list(inputs), out_dir)
    calibration = _calibration(detector)
    note = detector.info.get("calibration_note") if calibration is None else None
    _check_threshold(model, thr, calibration, note, class_name)
    mode = thr if thr is not None else ("auto" if calibration is not None else None)
    _assign_classes(model, detector, jobs, class_name)
    # Error rows name the calibration as `predict --model FILE` always has: by its test run id.
    thresholds = Thresholds(mode, calibration, named=f"test run {calibration.test_run_id}" if calibration else None)
    outputs = ImageOutputs(out_dir, thresholds, save_maps, contour_level)
    if reporter is not None:
        reporter.info(f"predicting {len(jobs)} images with {model} ({detector.info['format']}, "
                      f"{detector.info.get('precision', 'fp32')})"
                      + (f", calibrated by {calibration.dataset} test run {calibration.test_run_id}" if calibration else ""))
    bs = batch_size or int(detector.info.get("batch_size") or DEFAULT_BATCH)
    rows = score_in_batches(jobs, bs, lambda job: detector.preprocess(job.path), _scorer(detector, outputs), outputs,
                            reporter.eval_progress if reporter is not None else None)
    head = {"model": str(Path(model).resolve()), "run_id": provenance.get("run_id"),
            "checkpoint": provenance.get("checkpoint")}
    return write_summary(head, calibration, note, mode, out_dir, rows)
