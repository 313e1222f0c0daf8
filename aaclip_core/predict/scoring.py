"""Scoring images with a model: raw maps from the model in batches, on the calibration's scale; the
threshold, verdict, files and rows are `outputs`, the batching loop `batches` (shared with exported files)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from aaclip_score.batches import score_in_batches
from aaclip_score.inputs import ImageJob
from aaclip_score.outputs import ImageOutputs
from aaclip_score.postprocess import UNCALIBRATED, ClassCalibration, display_map

from aaclip_core.compute import autocast
from aaclip_core.data.dataset import load_image_tensor
from aaclip_core.evaluation.protocol import predict_batch
from aaclip_core.pictures.visualize import CLIP_MEAN, CLIP_STD, denormalise
from aaclip_core.recipe import Recipe


def score_image(raw_map: torch.Tensor, raw_det: float, cal: ClassCalibration | Mapping[str, float] | None, domain: str
                ) -> tuple[float, np.ndarray]:
    """(image score, heat map in [0, 1] for display): on the calibration's scale when there is one
    (exactly the test's score of the same image), else the same formula on the raw values. ``cal``
    may be a class's calibration as plain numbers (a report's or a sidecar's table)."""
    if isinstance(cal, Mapping):
        cal = ClassCalibration.from_dict(cal)
    raw_map = raw_map.float()
    _, scores = (UNCALIBRATED if cal is None else cal).apply(raw_map[None], torch.tensor([raw_det], dtype=torch.float32), domain)
    return float(scores[0]), display_map(raw_map, cal).numpy()


@dataclass
class BatchScorer:
    """Scores jobs with a model: raw maps and detection scores in batches, on the calibration's scale."""

    model: torch.nn.Module
    bank: object
    recipe: Recipe
    device: torch.device
    outputs: ImageOutputs

    def _read(self, job: ImageJob) -> torch.Tensor:
        return load_image_tensor(job.path, self.recipe.model.image_size, CLIP_MEAN, CLIP_STD)

    def _score(self, batch: list[tuple[ImageJob, torch.Tensor]]) -> list[dict]:
        images = torch.stack([image for _, image in batch]).to(self.device)
        with torch.no_grad(), autocast(self.device, self.recipe.runtime.precision):
            maps, det = predict_batch(self.model, self.bank, images, [job.class_name for job, _ in batch], self.recipe)
        cal = self.outputs.thresholds.calibration
        rows = []
        for (job, image), raw_map, raw_det in zip(batch, maps.float().cpu(), det.float().cpu()):
            score, heat = score_image(raw_map, float(raw_det), cal.classes.get(job.class_name) if cal else None,
                                      self.recipe.data.domain)
            rows.append(self.outputs.scored(job, denormalise(image, CLIP_MEAN, CLIP_STD), heat, raw_map.numpy(), score,
                                            float(raw_det)))
        return rows

    def run(self, jobs: list[ImageJob], batch_size: int, progress: Callable[[int, int], None]) -> list[dict]:
        """One row per job, in order; images that cannot be read or classed get an error row."""
        return score_in_batches(jobs, batch_size, self._read, self._score, self.outputs, progress)
