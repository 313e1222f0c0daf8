"""Anomaly-map pictures of a model: `test --visualize`, and the image tensors `predict` draws.

The drawing itself (panels, colours, contours) is `aaclip_score.overlay`, which needs no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from aaclip_score.overlay import save_overlay, verdict_line
from aaclip_score.postprocess import ClassCalibration, display_map
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

# The CLIP normalisation `load_image_tensor` and the dataset apply (OpenAI statistics).
CLIP_MEAN = tuple(OPENAI_DATASET_MEAN)
CLIP_STD = tuple(OPENAI_DATASET_STD)


def denormalise(image: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """A preprocessed image tensor [3, S, S] back to uint8 [S, S, 3] (the resized picture the model saw)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (image.detach().float().cpu() * s + m) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------ test --visualize


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def select_cases(image_scores: list[dict], n: int) -> dict[str, list[tuple[str, int, dict]]]:
    """Per class, the cases `test --visualize N` draws: the N highest-scoring anomalous images (the
    clearest detections, "best") and the N highest-scoring normal images (the likeliest false alarms,
    "worst"). Returns class -> [(kind, rank, row)], rank from 1."""
    out: dict[str, list[tuple[str, int, dict]]] = {}
    by_class: dict[str, list[dict]] = {}
    for row in image_scores:
        by_class.setdefault(row["class_name"], []).append(row)
    for c in sorted(by_class):
        rows = by_class[c]
        picks = []
        for label, kind in ((1, "best-anomalous"), (0, "worst-normal")):
            ranked = sorted((r for r in rows if int(r["label"]) == label), key=lambda r: -float(r["image_score"]))
            picks += [(kind, i + 1, r) for i, r in enumerate(ranked[:n])]
        out[c] = picks
    return out


@torch.no_grad()
def test_visualizations(model, bank, recipe, device, samples, report, n: int, out_dir: Path) -> list[Path]:
    """Write `test --visualize N` pictures under ``out_dir/<class>/``; the maps are recomputed for the
    selected images only and normalised with the class's test-set range (the report's calibration),
    which makes them the exact maps the metrics saw. Ground-truth masks are outlined in green."""
    from aaclip_core.compute import autocast
    from aaclip_core.evaluation.protocol import predict_batch
    from aaclip_core.training.data import make_dataset

    if n <= 0:
        return []
    by_path = {str(s.image_path): s for s in samples}
    written: list[Path] = []
    model.eval()
    for c, picks in select_cases(report.image_scores, n).items():
        cal = report.calibration.get(c, {})
        chosen = [(kind, rank, row, by_path[row["path"]]) for kind, rank, row in picks if row["path"] in by_path]
        if not chosen:
            continue
        ds = make_dataset([p[3] for p in chosen], recipe, "none")
        items = [ds[i] for i in range(len(ds))]
        images = torch.stack([it["image"] for it in items]).to(device)
        with autocast(device, recipe.runtime.precision):
            maps, _ = predict_batch(model, bank, images, [c] * len(items), recipe)
        maps = maps.float().cpu().numpy()
        for (kind, rank, row, sample), item, raw in zip(chosen, items, maps):
            heat = display_map(raw, ClassCalibration.from_dict(cal) if cal else None)
            src = Path(sample.image_path)
            name = f"{kind}-{rank:02d}_{_safe_name(src.parent.name + '-' + src.stem)}_score{float(row['image_score']):.3f}.png"
            truth = "anomalous" if int(row["label"]) == 1 else "normal"
            footer = verdict_line(float(row["image_score"]), cal.get("image_threshold"), "F1-max on this test set")
            written.append(save_overlay(out_dir / _safe_name(c) / name, denormalise(item["image"]), heat,
                                        gt_mask=item["mask"][0].numpy() > 0.5,
                                        footer=f"{footer}   |   truth: {truth.upper()}"))
    return written


def log_test_visualizations(mlflow, model, bank, recipe, device, samples, report, n: int) -> list[str]:
    """`test --visualize N`: write the pictures and log them to the active run under
    ``visualizations/<class>/``; returns the artifact paths."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aaclip-vis-") as tmp:
        root = Path(tmp)
        paths = test_visualizations(model, bank, recipe, device, samples, report, n, root)
        if paths:
            mlflow.log_artifacts(str(root), "visualizations")
        return [f"visualizations/{p.relative_to(root).as_posix()}" for p in paths]
