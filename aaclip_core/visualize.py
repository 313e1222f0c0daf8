"""Anomaly-map pictures: three panels side by side at the evaluation resolution.

    [ image | heat map over the image | image with the thresholded contour ]

Each panel is S x S pixels (S = ``recipe.model.image_size``, the resolution `test` scores at), so a
picture is 3S x S. The heat map is the min-max normalised pixel map (on the scale of the test set
of its class when calibrated), clipped to [0, 1] and coloured with matplotlib's ``jet`` colormap;
the contour (red) is the boundary of ``map >= level`` (default 0.5 of that normalised scale) and,
when a ground-truth mask is given (`test --visualize`), its boundary is drawn in green.

Only matplotlib's colormaps are used (no pyplot, so no GUI backend is ever loaded); everything
else is numpy and PIL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

CONTOUR_LEVEL = 0.5
HEAT_ALPHA = 0.5
COLORMAP = "jet"
PRED_COLOUR = (255, 0, 0)
GT_COLOUR = (0, 255, 0)

# The CLIP normalisation `load_image_tensor` and the dataset apply (OpenAI statistics).
CLIP_MEAN = tuple(OPENAI_DATASET_MEAN)
CLIP_STD = tuple(OPENAI_DATASET_STD)


def denormalise(image: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """A preprocessed image tensor [3, S, S] back to uint8 [S, S, 3] (the resized picture the model saw)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = (image.detach().float().cpu() * s + m) * 255.0
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def normalise_for_display(raw_map: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(map - lo) / (hi - lo) clipped to [0, 1]; lo/hi default to the map's own min and max."""
    m = np.asarray(raw_map, dtype=np.float32)
    lo = float(m.min()) if lo is None else float(lo)
    hi = float(m.max()) if hi is None else float(hi)
    if not hi > lo:
        return np.zeros_like(m)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0)


def mask_boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean boundary of a binary mask: mask pixels with a 4-neighbour outside it (the image edge
    counts as outside), thickened inwards/outwards to ``width`` pixels. Pure numpy."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = m & ~interior
    for _ in range(max(0, width - 1)):
        q = np.pad(edge, 1, constant_values=False)
        edge = q[1:-1, 1:-1] | q[:-2, 1:-1] | q[2:, 1:-1] | q[1:-1, :-2] | q[1:-1, 2:]
    return edge


def heat_rgb(heat: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 [H, W, 3] through the colormap."""
    from matplotlib import colormaps

    rgba = colormaps[COLORMAP](np.clip(heat, 0.0, 1.0))
    return (rgba[..., :3] * 255.0).round().astype(np.uint8)


def overlay_panels(
    image: np.ndarray,
    heat: np.ndarray,
    level: float = CONTOUR_LEVEL,
    gt_mask: np.ndarray | None = None,
    alpha: float = HEAT_ALPHA,
) -> Image.Image:
    """The three-panel picture (3W x H) for an RGB uint8 image [H, W, 3] and a heat map [H, W] in [0, 1]."""
    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (h, w):
        raise ValueError(f"heat map {heat.shape} does not match the image {img.shape[:2]}")
    blend = ((1 - alpha) * img.astype(np.float32) + alpha * heat_rgb(heat).astype(np.float32)).round()
    blend = blend.clip(0, 255).astype(np.uint8)
    contour = img.copy()
    if gt_mask is not None:
        contour[mask_boundary(np.asarray(gt_mask, dtype=bool), width=1)] = GT_COLOUR
    contour[mask_boundary(heat >= level, width=2 if min(h, w) >= 64 else 1)] = PRED_COLOUR
    return Image.fromarray(np.concatenate([img, blend, contour], axis=1), mode="RGB")


def save_overlay(path: Path, image: np.ndarray, heat: np.ndarray, level: float = CONTOUR_LEVEL,
                 gt_mask: np.ndarray | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_panels(image, heat, level, gt_mask).save(path, format="PNG")
    return path


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
    from .evaluation import predict_batch
    from .runtime import autocast
    from .training.data import make_dataset

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
            heat = normalise_for_display(raw, cal.get("map_min"), cal.get("map_max"))
            src = Path(sample.image_path)
            name = f"{kind}-{rank:02d}_{_safe_name(src.parent.name + '-' + src.stem)}_score{float(row['image_score']):.3f}.png"
            written.append(save_overlay(out_dir / _safe_name(c) / name, denormalise(item["image"]), heat,
                                        gt_mask=item["mask"][0].numpy() > 0.5))
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
