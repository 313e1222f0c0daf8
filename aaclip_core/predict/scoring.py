"""Scoring images in batches: raw maps from the model, the calibration's scale, threshold and
verdict, overlay (and raw map) files, one row per image."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..calibration import Calibration, ClassCalibration, uncalibrated_score
from ..config import Recipe
from ..data.dataset import load_image_tensor
from ..errors import DataError
from ..evaluation import predict_batch
from ..runtime import autocast
from ..visualize import CLIP_MEAN, CLIP_STD, denormalise, save_overlay, verdict_line
from .inputs import ROW_KEYS, ImageJob, row  # noqa: F401 - ROW_KEYS re-exported

def score_image(raw_map: torch.Tensor, raw_det: float, cal: ClassCalibration | Mapping[str, float] | None, domain: str
                ) -> tuple[float, np.ndarray]:
    """(image score, heat map in [0, 1] for display): on the calibration's scale when there is one
    (exactly the test's score of the same image), else the same formula on the raw values. ``cal``
    may be a class's calibration as plain numbers (a report's or a sidecar's table)."""
    if isinstance(cal, Mapping):
        cal = ClassCalibration.from_dict(cal)
    raw_map = raw_map.float()
    det = torch.tensor([raw_det], dtype=torch.float32)
    if cal is None:
        heat, score = uncalibrated_score(raw_map, det, domain)
        return float(score), heat.numpy()
    maps, scores = cal.apply(raw_map[None], det, domain)
    return float(scores[0]), maps[0].clamp(0, 1).numpy()


@dataclass
class Thresholds:
    """The verdict threshold per class: a number given by the user, the calibration's F1-optimal
    one (``auto``), or none."""

    mode: float | str | None
    calibration: Calibration | None

    def of(self, class_name: str | None) -> tuple[float | None, str]:
        if isinstance(self.mode, float):
            return self.mode, "user"
        if self.mode == "auto" and self.calibration is not None:
            return self.calibration.threshold(class_name or ""), self.calibration.source
        return None, "none"


@dataclass
class BatchScorer:
    model: torch.nn.Module
    bank: object
    recipe: Recipe
    device: torch.device
    out_dir: Path
    thresholds: Thresholds
    save_maps: bool = False
    contour_level: float = 0.5

    def _row(self, job: ImageJob, image: torch.Tensor, raw_map: torch.Tensor, raw_det: float) -> dict:
        cal = self.thresholds.calibration
        score, heat = score_image(raw_map, raw_det, cal.classes.get(job.class_name) if cal else None,
                                  self.recipe.data.domain)
        t, source = self.thresholds.of(job.class_name)
        error = None
        if self.thresholds.mode == "auto" and t is None:
            error = (f"no F1-optimal threshold for class '{job.class_name}' in {cal.label}; "
                     "pass a numeric --threshold")
        verdict = None if t is None else ("anomalous" if score >= t else "normal")
        footer = verdict_line(score, t, source, verdict)
        if cal is None or job.class_name not in cal.classes:
            footer += "   |   raw (uncalibrated) scale"
        overlay = save_overlay(self.out_dir / "overlays" / job.key.with_suffix(".png"),
                               denormalise(image, CLIP_MEAN, CLIP_STD), heat, self.contour_level,
                               footer=f"{job.class_name}   |   {footer}")
        map_path = None
        if self.save_maps:
            map_path = self.out_dir / "overlays" / job.key.with_suffix(".npy")
            np.save(map_path, raw_map.numpy().astype(np.float32))
        return row(job, image_score=score, raw_map_max=float(raw_map.max()), raw_det=float(raw_det), threshold=t,
                   threshold_source=source, verdict=verdict,
                   overlay=str(overlay.resolve()), map=str(map_path.resolve()) if map_path else None, error=error)

    def _flush(self, batch: list[tuple[int, ImageJob, torch.Tensor]], rows: list) -> None:
        images = torch.stack([b[2] for b in batch]).to(self.device)
        with torch.no_grad(), autocast(self.device, self.recipe.runtime.precision):
            maps, det = predict_batch(self.model, self.bank, images, [b[1].class_name for b in batch], self.recipe)
        for (pos, job, image), raw_map, raw_det in zip(batch, maps.float().cpu(), det.float().cpu()):
            rows[pos] = self._row(job, image, raw_map, float(raw_det))

    def run(self, jobs: list[ImageJob], batch_size: int, progress: Callable[[int, int], None]) -> list[dict]:
        """One row per job, in order; images that cannot be read or classed get an error row."""
        rows: list[dict | None] = [None] * len(jobs)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        size = self.recipe.model.image_size
        batch: list[tuple[int, ImageJob, torch.Tensor]] = []
        n_batches = max(1, math.ceil(sum(j.error is None for j in jobs) / batch_size))
        done = 0
        for pos, job in enumerate(jobs):
            if job.error is None:
                try:
                    batch.append((pos, job, load_image_tensor(job.path, size, CLIP_MEAN, CLIP_STD)))
                except DataError as exc:
                    job.error = str(exc)
            if job.error is not None:
                t, source = self.thresholds.of(job.class_name)
                rows[pos] = row(job, threshold=t, threshold_source=source, error=job.error)
            if len(batch) == batch_size:
                self._flush(batch, rows)
                batch, done = [], done + 1
                progress(done, n_batches)
        if batch:
            self._flush(batch, rows)
            progress(n_batches, n_batches)
        return [r for r in rows if r is not None]
