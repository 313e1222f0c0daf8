"""The reference evaluation protocol (SPEC §5), plus AUPRO and F1-max labelled as extras.

Per class: the pixel map is the sum over levels of the blurred, up-sampled (abnormal + 1 - normal)/2
score; the detection score is (det @ T_abnormal + 1)/2. Both are min-max normalised over the whole
class; the industrial image score is 0.5 * max(pixel map) + 0.5 * detection, the medical one
max(pixel map). Metrics are raw floats in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from aaclip_score.postprocess import ClassCalibration
from torch.utils.data import DataLoader

from aaclip_core import distributed
from aaclip_core.compute import autocast
from aaclip_core.evaluation import metrics
from aaclip_core.evaluation.calibration import fit_class_calibration
from aaclip_core.evaluation.pixel_pairs import PixelPairs, pixel_pairs
from aaclip_core.model import AACLIP
from aaclip_core.model.similarity import test_map
from aaclip_core.names import METRIC_NAMES
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.recipe import Recipe


@dataclass
class ClassMaps:
    """Raw (un-normalised) outputs of one class: what the metrics and `predict --save-maps` see."""

    maps: torch.Tensor  # [N, S, S] float32, summed over levels
    det: torch.Tensor  # [N] float32, (det @ T_abnormal + 1) / 2
    masks: torch.Tensor  # [N, S, S] bool
    labels: torch.Tensor  # [N] int64
    indices: list[int] = field(default_factory=list)  # sample indices, in order


@dataclass
class ClassResult:
    class_name: str
    n_images: int
    n_anomalous: int
    pixel_auroc: float
    pixel_ap: float
    image_auroc: float
    image_ap: float
    aupro: float
    pixel_f1_max: float
    image_f1_max: float


@dataclass
class EvalReport:
    classes: list[ClassResult]
    mean: dict[str, float]
    image_scores: list[dict] = field(default_factory=list)  # per image: path, class, label, score
    # Per class: the raw ranges behind the min-max normalisation and the F1-optimal image threshold,
    # so new images (`predict`) can be scored on the scale the held-out results were computed on.
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per class: exact pixel pair counts and the image paths they are indexed by (`compare`).
    pixel_pairs: dict[str, tuple[list[str], PixelPairs]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"classes": [asdict(c) for c in self.classes], "mean": self.mean, "calibration": self.calibration}


@torch.no_grad()
def predict_batch(model: AACLIP, bank: AnchorBank, images: torch.Tensor, class_names: list[str], recipe: Recipe):
    """Raw pixel maps [B, S, S] and detection scores [B] for one batch; each image independent of
    the others (no batch statistics anywhere)."""
    context = model.anchor_context(images) if model.conditions_text else None
    anchors = bank.anchors(class_names, context)
    text_ctx = bank.text_context(class_names) if model.image_cross_attn is not None and model.use_image_cross else None
    return raw_scores(model, images, anchors, text_ctx, recipe.model.image_size, recipe.data.domain)


def raw_scores(
    model: AACLIP, images: torch.Tensor, anchors: torch.Tensor, text_context: torch.Tensor | None, size: int, domain: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixel maps [B, S, S] and detection scores [B] from each image's anchors [B, E, 2]: the
    part of the protocol shared by `test`, `predict` and the exported graph (`deploy.graph`)."""
    seg, det = model.encode_image(images, text_context)
    # Scores are computed in fp32 even when the backbone ran under bf16/fp16 autocast: the maps
    # are what the metrics rank, and reduced precision would quantise them into ties.
    with torch.autocast(images.device.type, enabled=False):
        anchors = anchors.float()
        maps = sum(test_map(f.float(), anchors, size, domain) for f in seg)
        det_score = (torch.einsum("be,be->b", det.float(), anchors[..., 1]) + 1) / 2
    return maps, det_score


@torch.no_grad()
def collect_maps(
    model: AACLIP,
    bank: AnchorBank,
    loader: DataLoader,
    recipe: Recipe,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, ClassMaps]:
    model.eval()
    bank.freeze()
    per_class: dict[str, list] = {}
    for b, batch in enumerate(loader):
        images = batch["image"].to(device, non_blocking=True)
        classes = list(batch["class_name"])
        with autocast(device, recipe.runtime.precision):
            maps, det = predict_batch(model, bank, images, classes, recipe)
        maps, det = maps.float().cpu(), det.float().cpu()
        masks = batch["mask"][:, 0] > 0.5
        for i, c in enumerate(classes):
            per_class.setdefault(c, []).append((maps[i], det[i], masks[i], batch["label"][i], int(batch["index"][i])))
        if progress is not None:
            progress(b + 1, len(loader))
    out = {}
    for c, rows in per_class.items():
        out[c] = ClassMaps(
            maps=torch.stack([r[0] for r in rows]),
            det=torch.stack([r[1] for r in rows]),
            masks=torch.stack([r[2] for r in rows]),
            labels=torch.stack([r[3] for r in rows]).long(),
            indices=[r[4] for r in rows],
        )
    return out


def gather_class_maps(per_class: dict[str, ClassMaps]) -> dict[str, ClassMaps] | None:
    """Every rank's maps merged on rank 0 in sample order (None on the other ranks): the classes'
    min-max normalisation and the exact metrics need all of a class's images together."""
    shares = distributed.gather_objects(per_class)
    if shares is None or len(shares) == 1:
        return shares[0] if shares else None
    out = {}
    for c in sorted({c for share in shares for c in share}):
        rows: dict[int, tuple] = {}
        for share in shares:
            if c in share:
                cm = share[c]
                for j, idx in enumerate(cm.indices):
                    rows[idx] = (cm.maps[j], cm.det[j], cm.masks[j], cm.labels[j])
        order = sorted(rows)
        out[c] = ClassMaps(
            maps=torch.stack([rows[i][0] for i in order]),
            det=torch.stack([rows[i][1] for i in order]),
            masks=torch.stack([rows[i][2] for i in order]),
            labels=torch.stack([rows[i][3] for i in order]),
            indices=order,
        )
    return out


def _safe(fn, *args, **kwargs):
    """A metric that is undefined for this class (one label only) is NaN, not 0; any other bad
    input is a bug and propagates."""
    try:
        return fn(*args, **kwargs)
    except metrics.UndefinedMetricError:
        return math.nan


def _detection(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUROC, AP and F1-max from one sort (the pixel arrays run to tens of millions)."""
    out = _safe(metrics.detection_metrics, scores, labels)
    if isinstance(out, float):
        return {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan}
    return out


def image_scores(cm: ClassMaps, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised pixel maps, image scores) of a class under the reference protocol: min-max over
    the class's test set (:mod:`aaclip_score.postprocess`)."""
    return ClassCalibration.ranges_of(cm.maps, cm.det).apply(cm.maps, cm.det, domain)


def score_class(name: str, cm: ClassMaps, recipe: Recipe, normalised: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> ClassResult:
    """The metrics of a class; ``normalised``: its (maps, image scores) when already computed."""
    maps, score = normalised or image_scores(cm, recipe.data.domain)
    masks = cm.masks
    aupro = math.nan
    if recipe.eval.aupro:
        aupro = _safe(metrics.aupro, maps, masks, num_thresholds=recipe.eval.aupro_thresholds or None)
    pixel = _detection(maps, masks)
    image = _detection(score, cm.labels)
    return ClassResult(
        class_name=name,
        n_images=len(cm.labels),
        n_anomalous=int(cm.labels.sum()),
        pixel_auroc=float(pixel["auroc"]),
        pixel_ap=float(pixel["ap"]),
        image_auroc=float(image["auroc"]),
        image_ap=float(image["ap"]),
        aupro=float(aupro),
        pixel_f1_max=float(pixel["f1_max"]),
        image_f1_max=float(image["f1_max"]),
    )


def mean_over_classes(results: list[ClassResult]) -> dict[str, float]:
    """Mean of each metric over the classes where it is defined (NaN where none is)."""
    out = {}
    for m in METRIC_NAMES:
        vals = [getattr(r, m) for r in results if not math.isnan(getattr(r, m))]
        out[m] = float(np.mean(vals)) if vals else math.nan
    return out


def evaluate(
    model: AACLIP,
    bank: AnchorBank,
    loader: DataLoader,
    recipe: Recipe,
    device: torch.device,
    sample_paths: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport | None:
    """The report of the loader's images. Under torchrun each rank scores its share of the batches
    and rank 0 gets the report (the other ranks None), equal to a one-process evaluation."""
    per_class = gather_class_maps(collect_maps(model, bank, loader, recipe, device, progress))
    if per_class is None:
        return None
    results = []
    rows = []
    calibration = {}
    pairs = {}
    for c in sorted(per_class):
        cm = per_class[c]
        cal = fit_class_calibration(cm.maps, cm.det, cm.labels, recipe.data.domain)
        maps, score = cal.apply(cm.maps, cm.det, recipe.data.domain)
        results.append(score_class(c, cm, recipe, (maps, score)))
        calibration[c] = cal.as_dict()
        if recipe.eval.pixel_pairs:
            # On the normalised maps the metrics were computed on, so the counts reproduce them exactly.
            paths = [sample_paths[i] if sample_paths else str(i) for i in cm.indices]
            pairs[c] = (paths, pixel_pairs(maps, cm.masks))
        raw_max = cm.maps.flatten(1).max(dim=1).values
        for j, idx in enumerate(cm.indices):
            rows.append(
                {
                    "path": sample_paths[idx] if sample_paths else str(idx),
                    "class_name": c,
                    "label": int(cm.labels[j]),
                    "image_score": float(score[j]),
                    "raw_map_max": float(raw_max[j]),
                    "raw_det": float(cm.det[j]),
                }
            )
    return EvalReport(classes=results, mean=mean_over_classes(results), image_scores=rows, calibration=calibration,
                      pixel_pairs=pairs)

