"""`aaclip predict --model FILE`: score images with an exported detector (ONNX or TorchScript) alone,
writing what `predict --run` writes: overlays, optional raw maps, ``predictions.jsonl`` and the
summary, with the same rules for classes, thresholds and verdicts (see `aaclip_core.predict`).

The scale is the exported calibration (the sidecar's ``calibration``, baked into the graph): a
calibrated class scores on its test run's scale and ``--threshold auto`` takes its F1-optimal
threshold; a class without calibration scores on the raw scale, where only a numeric threshold
gives a verdict, and its overlay's heat map is normalised by the image's own map.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..overlay import save_overlay, verdict_line
from ..calibration import Calibration
from ..predict import PREDICTIONS_FILE, ImageJob, collect_images, parse_threshold, resolve_class
from ..predict.inputs import row as _row
from ..scale import minmax
from .runtime import Detector, load_detector

DEFAULT_BATCH = 8


def _heat(raw_map: np.ndarray, nmap: np.ndarray, calibrated: bool) -> np.ndarray:
    """The overlay's heat map, as `predict.score_image` draws it."""
    if calibrated:
        return np.clip(nmap, 0.0, 1.0)
    return minmax(np.asarray(raw_map, dtype=np.float32))


def _calibration(detector: Detector) -> Calibration | None:
    source = detector.info.get("calibration_source")
    classes = detector.info.get("calibration") or {}
    if not source or not classes:
        return None
    checkpoint = (detector.info.get("provenance") or {}).get("checkpoint", "?")
    return Calibration.from_dict({**source, "checkpoint": checkpoint, "classes": classes})


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
) -> dict:
    """Like `predict.predict_images`, with an exported file in place of a run."""
    thr = parse_threshold(threshold)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    detector = load_detector(model, threads)
    provenance = detector.info.get("provenance") or {}
    run_id = provenance.get("run_id")
    out_dir = Path(out_dir) if out_dir is not None else Path(f"aaclip-predict-{Path(model).stem}")
    jobs = collect_images(list(inputs), out_dir)
    calibration = _calibration(detector)
    cal_classes = calibration.classes if calibration else {}
    note = detector.info.get("calibration_note") if calibration is None else None
    if thr == "auto" and calibration is None:
        raise ConfigError(
            f"--threshold auto takes the F1-optimal thresholds exported with the model, but {model} was exported "
            f"without calibration ({note or 'no test run'}). Test the run and export it again, or pass a numeric "
            "--threshold."
        )
    if thr == "auto" and class_name and calibration.threshold(class_name) is None:
        raise ConfigError(
            f"--threshold auto: {model} has no F1-optimal threshold for class '{class_name}' (it has: "
            f"{', '.join(sorted(cal_classes)) or 'none'}). Pass a numeric --threshold."
        )
    mode = thr if thr is not None else ("auto" if calibration is not None else None)
    known = set(detector.classes)
    if class_name and class_name not in known:
        raise ConfigError(
            f"--class {class_name}: {model} was exported for {', '.join(detector.classes)} only (the class's text "
            f"anchors are baked into the file). Export the run again with --class {class_name}."
        )
    for job in jobs:
        try:
            job.class_name = resolve_class(job.path, class_name, known)
        except DataError as exc:
            job.error = str(exc)
            continue
        if job.class_name not in known:  # named by a dataset layout, but not baked into the file
            job.error = (f"class '{job.class_name}' is not in {model} (it has: {', '.join(detector.classes)}); "
                         f"export the run again with --class {job.class_name}")

    def threshold_for(c: str | None) -> tuple[float | None, str]:
        if isinstance(mode, float):
            return mode, "user"
        if mode == "auto":
            return calibration.threshold(c or ""), calibration.source
        return None, "none"

    if reporter is not None:
        reporter.info(f"predicting {len(jobs)} images with {model} ({detector.info['format']}, "
                      f"{detector.info.get('precision', 'fp32')})"
                      + (f", calibrated by {calibration.dataset} test run {calibration.test_run_id}" if calibration else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict | None] = [None] * len(jobs)

    def flush(batch: list[tuple[int, ImageJob, np.ndarray, np.ndarray]]) -> None:
        out = detector.score(np.stack([b[2] for b in batch]), [b[1].class_name for b in batch])
        for j, (pos, job, _, picture) in enumerate(batch):
            raw_map = out["raw_map"][j]
            score = float(out["score"][j])
            t, source = threshold_for(job.class_name)
            error = None
            if mode == "auto" and t is None:
                error = (f"no F1-optimal threshold for class '{job.class_name}' in test run "
                         f"{calibration.test_run_id}; pass a numeric --threshold")
            heat = _heat(raw_map, out["map"][j], job.class_name in cal_classes)
            verdict = None if t is None else ("anomalous" if score >= t else "normal")
            footer = verdict_line(score, t, source, verdict)
            if job.class_name not in cal_classes:
                footer += "   |   raw (uncalibrated) scale"
            overlay = save_overlay(out_dir / "overlays" / job.key.with_suffix(".png"), picture, heat, contour_level,
                                   footer=f"{job.class_name}   |   {footer}")
            map_path = None
            if save_maps:
                map_path = out_dir / "overlays" / job.key.with_suffix(".npy")
                np.save(map_path, raw_map.astype(np.float32))
            rows[pos] = _row(
                job,
                image_score=score,
                raw_map_max=float(raw_map.max()),
                raw_det=float(out["raw_det"][j]),
                threshold=t,
                threshold_source=source,
                verdict=verdict,
                overlay=str(overlay.resolve()),
                map=str(map_path.resolve()) if map_path else None,
                error=error,
            )

    bs = batch_size or int(detector.info.get("batch_size") or DEFAULT_BATCH)
    todo = [j for j in jobs if j.error is None]
    n_batches, done = max(1, math.ceil(len(todo) / bs)), 0
    batch: list[tuple[int, ImageJob, np.ndarray, np.ndarray]] = []
    for pos, job in enumerate(jobs):
        if job.error is None:
            try:
                batch.append((pos, job, *detector.preprocess(job.path)))
            except DataError as exc:
                job.error = str(exc)
        if job.error is not None:
            t, source = threshold_for(job.class_name)
            rows[pos] = _row(job, threshold=t, threshold_source=source, error=job.error)
        if len(batch) == bs:
            flush(batch)
            batch = []
            done += 1
            if reporter is not None:
                reporter.eval_progress(done, n_batches)
    if batch:
        flush(batch)
        if reporter is not None:
            reporter.eval_progress(n_batches, n_batches)

    final = [r for r in rows if r is not None]
    pred_path = out_dir / PREDICTIONS_FILE
    with open(pred_path, "w", encoding="utf-8") as fh:
        for r in final:
            fh.write(json.dumps(r, sort_keys=False) + "\n")
    return {
        "model": str(Path(model).resolve()),
        "run_id": run_id,
        "checkpoint": provenance.get("checkpoint"),
        "calibration": (
            {"test_run_id": calibration.test_run_id, "dataset": calibration.dataset} if calibration else None
        ),
        "calibration_note": note,
        "threshold": mode,
        "out_dir": str(out_dir.resolve()),
        "predictions": str(pred_path.resolve()),
        "n_images": len(final),
        "n_errors": sum(r["error"] is not None for r in final),
        "n_anomalous": sum(r["verdict"] == "anomalous" for r in final),
        "rows": final,
    }
