"""What `predict` writes, the same for a model (``--run``, a model folder) and for an exported file
(``--model FILE``): each image's threshold and verdict, its overlay (and raw map) file and row, then
``predictions.jsonl`` and the summary.

Works on numpy arrays and plain floats only (no torch, no model, no open_clip or mlflow): each scorer turns
its own outputs into an image score and a heat map, then hands them here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aaclip_score.calibration import Calibration
from aaclip_score.errors import ConfigError
from aaclip_score.files import atomic_path, atomic_write_text
from aaclip_score.inputs import ImageJob, row
from aaclip_score.overlay import save_overlay, verdict_line

PREDICTIONS_FILE = "predictions.jsonl"
RAW_SCALE_NOTE = "raw (uncalibrated) scale"


def parse_threshold(value: str | float | None) -> float | str | None:
    """None, the string 'auto', or a finite number; anything else is a usage error."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise ConfigError(f"--threshold must be a number or 'auto', got {value!r}.")
    return x


def _out_dir_problem(out_dir: Path) -> str | None:
    path = Path(os.path.abspath(out_dir))
    if path.exists():
        if not path.is_dir():
            return "it is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "you may not write in it"
    ancestor = next(a for a in path.parents if a.exists())
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    return None if os.access(ancestor, os.W_OK | os.X_OK) else f"you may not create folders in {ancestor}"


def _out_dir_error(out_dir: Path, why: str) -> ConfigError:
    return ConfigError(f"--out folder {out_dir} cannot be written: {why}. Pass --out a folder you can write in.")


def check_out_dir(out_dir: Path) -> None:
    """Fail before any model is loaded when ``--out`` cannot become a folder to write in; creates nothing."""
    why = _out_dir_problem(out_dir)
    if why is not None:
        raise _out_dir_error(out_dir, why)


def make_out_dir(out_dir: Path) -> None:
    """Create ``--out`` (and its parents); a failure the check could not foresee (a read-only or
    virtual file system, a race) is the same one paragraph."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _out_dir_error(out_dir, exc.strerror or str(exc)) from None


@dataclass
class Thresholds:
    """The verdict threshold per class: a number given by the user, the calibration's F1-optimal
    one (``auto``), or none. ``named`` is how an error row names the calibration (its label
    unless the caller words it otherwise)."""

    mode: float | str | None
    calibration: Calibration | None
    named: str | None = None

    def of(self, class_name: str | None) -> tuple[float | None, str]:
        if isinstance(self.mode, float):
            return self.mode, "user"
        if self.mode == "auto" and self.calibration is not None:
            return self.calibration.threshold(class_name or ""), self.calibration.source
        return None, "none"

    def calibrated(self, class_name: str | None) -> bool:
        return self.calibration is not None and class_name in self.calibration.classes

    def missing(self, class_name: str | None, threshold: float | None) -> str | None:
        """The error of an image scored under ``auto`` whose class has no F1-optimal threshold."""
        if self.mode != "auto" or threshold is not None:
            return None
        named = self.named or self.calibration.label
        return f"no F1-optimal threshold for class '{class_name}' in {named}; pass a numeric --threshold"


@dataclass
class ImageOutputs:
    """One image's files and row under ``out_dir``: overlay PNG, optional raw map ``.npy``."""

    out_dir: Path
    thresholds: Thresholds
    save_maps: bool = False
    contour_level: float = 0.5

    def scored(self, job: ImageJob, picture: np.ndarray, heat: np.ndarray, raw_map: np.ndarray, score: float,
               raw_det: float) -> dict:
        """``picture`` uint8 [S, S, 3] as the model saw it, ``heat`` the display map in [0, 1],
        ``raw_map`` the model's raw pixel map, ``score`` on the calibration's (or the raw) scale."""
        t, source = self.thresholds.of(job.class_name)
        verdict = None if t is None else ("anomalous" if score >= t else "normal")
        footer = verdict_line(score, t, source, verdict)
        if not self.thresholds.calibrated(job.class_name):
            footer += f"   |   {RAW_SCALE_NOTE}"
        overlay = save_overlay(self.out_dir / "overlays" / job.key.with_suffix(".png"), picture, heat,
                               self.contour_level, footer=f"{job.class_name}   |   {footer}")
        map_path = None
        if self.save_maps:
            map_path = self.out_dir / "overlays" / job.key.with_suffix(".npy")
            with atomic_path(map_path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.asarray(raw_map).astype(np.float32))
        return row(job, image_score=score, raw_map_max=float(raw_map.max()), raw_det=float(raw_det), threshold=t,
                   threshold_source=source, verdict=verdict, overlay=str(overlay.resolve()),
                   map=str(map_path.resolve()) if map_path else None,
                   error=self.thresholds.missing(job.class_name, t))

    def failed(self, job: ImageJob) -> dict:
        """The row of an image that could not be read or classed (``job.error``)."""
        t, source = self.thresholds.of(job.class_name)
        return row(job, threshold=t, threshold_source=source, error=job.error)


def write_summary(head: dict, cal: Calibration | None, note: str | None, mode, out_dir: Path,
                  rows: list[dict]) -> dict:
    """Write ``predictions.jsonl`` (one row a line, in order) and return the summary: ``head`` (which
    model: run id, label, checkpoint), then the calibration, threshold, files and counts."""
    pred_path = out_dir / PREDICTIONS_FILE
    atomic_write_text(pred_path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))
    return {
        **head,
        "calibration": {"test_run_id": cal.test_run_id, "dataset": cal.dataset} if cal else None,
        "calibration_note": note,
        "threshold": mode,
        "out_dir": str(out_dir.resolve()),
        "predictions": str(pred_path.resolve()),
        "n_images": len(rows),
        "n_errors": sum(r["error"] is not None for r in rows),
        "n_anomalous": sum(r["verdict"] == "anomalous" for r in rows),
        "rows": rows,
    }
