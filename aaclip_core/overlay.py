"""Anomaly-map pictures: three panels side by side at the evaluation resolution.

    [ image | heat map over the image | image with the thresholded contour ]

Each panel is S x S pixels (S = ``recipe.model.image_size``, the resolution `test` scores at), so a
picture is 3S x S. The heat map is the min-max normalised pixel map (on the scale of the test set
of its class when calibrated), clipped to [0, 1] and coloured with matplotlib's ``jet`` colormap;
the contour (red) is the boundary of ``map >= level`` (default 0.5 of that normalised scale) and,
when a ground-truth mask is given (`test --visualize`), its boundary is drawn in green.

numpy, PIL and matplotlib's colormaps only (no pyplot, so no GUI backend is ever loaded; no torch),
so the scorer of exported models (`aaclip_core.deploy`) draws the same pictures without the
training stack. `aaclip_core.visualize` adds what needs the model (`test --visualize`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CONTOUR_LEVEL = 0.5
HEAT_ALPHA = 0.5
COLORMAP = "jet"
PRED_COLOUR = (255, 0, 0)
GT_COLOUR = (0, 255, 0)


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
