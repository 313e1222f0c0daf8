"""What a change of precision costs: the evaluation protocol run through two exported files on the
same test images (SPEC §5 metrics per class and their mean), plus how far the calibrated image
scores move and how many verdicts flip at the exported thresholds."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from aaclip_score.detector import Detector

from aaclip_core.data import Sample
from aaclip_core.evaluation.protocol import METRIC_NAMES, ClassMaps, mean_over_classes, score_class
from aaclip_core.recipe import Recipe
from aaclip_core.training.data import make_dataset


def _outputs(detector: Detector, samples: list[Sample], recipe: Recipe, batch_size: int,
             progress: Callable[[int, int], None] | None) -> tuple[dict[str, ClassMaps], dict[str, np.ndarray]]:
    """Per class: raw maps/detections as ClassMaps (for the metrics) and the calibrated image scores."""
    dataset = make_dataset(samples, recipe, "none")
    rows: dict[str, list] = {}
    n_batches = math.ceil(len(dataset) / batch_size)
    for b in range(n_batches):
        items = [dataset[i] for i in range(b * batch_size, min(len(dataset), (b + 1) * batch_size))]
        images = torch.stack([it["image"] for it in items]).numpy()
        out = detector.score(images, [it["class_name"] for it in items])
        for j, it in enumerate(items):
            rows.setdefault(it["class_name"], []).append(
                (out["raw_map"][j], out["raw_det"][j], out["score"][j], it["mask"][0] > 0.5, it["label"], it["index"])
            )
        if progress is not None:
            progress(b + 1, n_batches)
    maps, scores = {}, {}
    for c, r in rows.items():
        maps[c] = ClassMaps(
            maps=torch.from_numpy(np.stack([x[0] for x in r])),
            det=torch.from_numpy(np.stack([x[1] for x in r])),
            masks=torch.stack([x[3] for x in r]),
            labels=torch.tensor([int(x[4]) for x in r], dtype=torch.long),
            indices=[int(x[5]) for x in r],
        )
        scores[c] = np.asarray([x[2] for x in r], dtype=np.float64)
    return maps, scores


def _summary(maps: dict[str, ClassMaps], recipe: Recipe) -> dict:
    results = [score_class(c, maps[c], recipe) for c in sorted(maps)]
    return {
        "classes": {r.class_name: {m: getattr(r, m) for m in METRIC_NAMES} for r in results},
        "mean": mean_over_classes(results),
    }


def compare_precisions(
    reference: Detector,
    candidate: Detector,
    samples: list[Sample],
    recipe: Recipe,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Metrics of both files on ``samples`` (classes the files lack are left out and listed) and the
    candidate's change: metric deltas (candidate - reference), the largest change of a calibrated
    image score, and the share of verdicts that differ at each class's exported threshold."""
    known = set(reference.classes)
    kept = [s for s in samples if s.class_name in known]
    skipped = sorted({s.class_name for s in samples} - known)
    if not kept:
        return {"n_images": 0, "skipped_classes": skipped,
                "note": "no test image belongs to an exported class; nothing was measured"}
    ref_maps, ref_scores = _outputs(reference, kept, recipe, batch_size, progress)
    cand_maps, cand_scores = _outputs(candidate, kept, recipe, batch_size, progress)
    ref, cand = _summary(ref_maps, recipe), _summary(cand_maps, recipe)
    score_diff = max(float(np.abs(cand_scores[c] - ref_scores[c]).max()) for c in ref_scores)
    flips, judged = 0, 0
    for c in ref_scores:
        t = reference.threshold(c)
        if t is not None:
            flips += int(((ref_scores[c] >= t) != (cand_scores[c] >= t)).sum())
            judged += len(ref_scores[c])
    return {
        "n_images": len(kept),
        "skipped_classes": skipped,
        "reference": ref,
        "candidate": cand,
        "delta_mean": {m: cand["mean"][m] - ref["mean"][m] for m in METRIC_NAMES},
        "max_abs_image_score_change": score_diff,
        "verdicts_judged": judged,
        "verdicts_changed": flips,
    }
