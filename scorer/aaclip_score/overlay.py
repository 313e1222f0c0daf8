"""Anomaly-map pictures a person reads at a glance: titled panels side by side,

    [ image | anomaly map + colour bar | ground truth (when known) | prediction ]

with the image score, the threshold and the verdict written underneath.

* The panels show the S x S image the model scored (S = ``recipe.model.image_size``), enlarged by a
  whole factor (nearest neighbour for masks, so a drawn pixel is exactly one scored pixel) until
  they are at least `MIN_PANEL` pixels wide.
* The anomaly map comes in as the post-processor's display map
  (:func:`aaclip_score.postprocess.display_map`: min-max normalised on the scale of its
  class's test set when calibrated, clipped to [0, 1]) and is coloured with matplotlib's ``jet``;
  the colour bar marks the pixel level.
* Ground truth and prediction are drawn the same unambiguous way: a translucent fill over exactly
  the pixels of the region and a solid outline along its inside edge. The picture's border is not
  an edge, so a region covering most of the image never turns into a frame around it; pixels
  outside the region are left untouched.
* The prediction is ``map >= level`` (default 0.5 on the normalised scale): the pixel level, not
  the image threshold, which decides the verdict from the image score.

numpy and PIL only: the ``jet`` colormap is matplotlib's table computed here from its segment data
(a test holds the two equal), and the font is matplotlib's DejaVu Sans, shipped in ``fonts/`` with
its licence. So the scorer (`aaclip_score`) draws the same pictures, byte for byte, without
matplotlib or the training stack; `aaclip_score.overlay` imports this module. `aaclip_core.pictures.visualize` adds what needs the model
(`test --visualize`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from aaclip_score.files import atomic_path

CONTOUR_LEVEL = 0.5
HEAT_ALPHA = 0.5
FILL_ALPHA = 0.4
COLORMAP = "jet"
PRED_COLOUR = (230, 20, 20)
GT_COLOUR = (20, 200, 60)
MIN_PANEL = 224
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)

# Layout (pixels of the picture).
_MARGIN = 8
_GAP = 10
_TITLE = 22
_FOOTER = 40  # two lines of text
_BAR = 14
_BAR_LABELS = 34
FONT_SIZE = 13

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


def mask_boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean inside edge of a binary mask: mask pixels with a 4-neighbour outside it, thickened
    inwards to ``width`` pixels. The picture's border does not count as outside (a region reaching
    the border is not outlined along it), and the edge never leaves the mask. Pure numpy."""
    m = np.asarray(mask, dtype=bool)
    edge = np.zeros_like(m)
    inside = m
    for _ in range(max(1, width)):
        p = np.pad(inside, 1, mode="edge")
        interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        edge |= inside & ~interior
        inside = interior
    return edge


# matplotlib's ``jet``: (x, value below x, value above x) per channel, its ``_jet_data``.
_JET_SEGMENTS = {
    "red": ((0.0, 0, 0), (0.35, 0, 0), (0.66, 1, 1), (0.89, 1, 1), (1.0, 0.5, 0.5)),
    "green": ((0.0, 0, 0), (0.125, 0, 0), (0.375, 1, 1), (0.64, 1, 1), (0.91, 0, 0), (1.0, 0, 0)),
    "blue": ((0.0, 0.5, 0.5), (0.11, 1, 1), (0.34, 1, 1), (0.65, 0, 0), (1.0, 0, 0)),
}
_LUT_SIZE = 256  # matplotlib's default number of colours


def _segment_lut(data, n: int) -> np.ndarray:
    """One channel's n-entry table, as matplotlib's ``LinearSegmentedColormap`` computes it."""
    a = np.asarray(data, dtype=np.float64)
    x, y0, y1 = a[:, 0] * (n - 1), a[:, 1], a[:, 2]
    xind = (n - 1) * np.linspace(0, 1, n)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    lut = np.concatenate([[y1[0]], distance * (y0[ind] - y1[ind - 1]) + y1[ind - 1], [y0[-1]]])
    return np.clip(lut, 0.0, 1.0)


@lru_cache(maxsize=1)
def _jet_rgb() -> np.ndarray:
    """uint8 [256, 3]: the colours of matplotlib's ``jet`` (each channel * 255, rounded)."""
    lut = np.stack([_segment_lut(_JET_SEGMENTS[c], _LUT_SIZE) for c in ("red", "green", "blue")], axis=1)
    return (lut * 255.0).round().astype(np.uint8)


def heat_rgb(heat: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 [H, W, 3] through the colormap, picking the table's entry as
    matplotlib does (``x * N`` truncated, 1.0 the last entry; NaN black)."""
    x = np.asarray(heat)
    x = np.clip(x if x.dtype.kind == "f" else x.astype(np.float64), 0.0, 1.0)
    x = x * x.dtype.type(_LUT_SIZE)  # in the map's own precision, as matplotlib multiplies
    bad = np.isnan(x)
    with np.errstate(invalid="ignore"):
        index = np.where(bad, 0, np.minimum(x, _LUT_SIZE - 1)).astype(int)
    rgb = _jet_rgb()[index]
    rgb[bad] = 0
    return rgb


def draw_region(image: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], width: int = 2) -> np.ndarray:
    """``image`` with ``region`` drawn as a translucent fill plus a solid inside outline; every pixel
    outside the region is returned unchanged."""
    out = np.asarray(image, dtype=np.uint8).copy()
    region = np.asarray(region, dtype=bool)
    tint = np.asarray(colour, dtype=np.float32)
    out[region] = ((1 - FILL_ALPHA) * out[region].astype(np.float32) + FILL_ALPHA * tint).round().astype(np.uint8)
    out[mask_boundary(region, width)] = colour
    return out


FONT_FILE = Path(__file__).with_name("fonts") / "DejaVuSans.ttf"  # matplotlib's, with its licence beside it


@lru_cache(maxsize=4)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.truetype(str(FONT_FILE), size)


@dataclass(frozen=True)
class OverlayLayout:
    """Where everything sits on an overlay picture; `overlay_picture` draws by it and tests read it."""

    size: tuple[int, int]  # (width, height)
    scale: int  # panel pixels per scored pixel
    panels: dict[str, Box]  # name -> box, left to right: image, anomaly map, ground truth?, prediction
    colour_bar: Box
    footer: Box


def overlay_layout(side: int, with_ground_truth: bool) -> OverlayLayout:
    """The layout of the picture for an S x S scored image."""
    scale = max(1, math.ceil(MIN_PANEL / side))
    p = side * scale
    top = _MARGIN + _TITLE
    x = _MARGIN
    panels: dict[str, Box] = {}
    names = ["image", "anomaly map", *(["ground truth"] if with_ground_truth else []), "prediction"]
    bar: Box = (0, 0, 0, 0)
    for name in names:
        panels[name] = (x, top, x + p, top + p)
        x += p
        if name == "anomaly map":
            bar = (x + 6, top, x + 6 + _BAR, top + p)
            x += 6 + _BAR + _BAR_LABELS
        x += _GAP
    width = x - _GAP + _MARGIN
    footer = (_MARGIN, top + p + 4, width - _MARGIN, top + p + 4 + _FOOTER)
    return OverlayLayout((width, footer[3] + _MARGIN // 2), scale, panels, bar, footer)


def _enlarge(a: np.ndarray, k: int) -> np.ndarray:
    return a if k == 1 else np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def _panel_titles(level: float) -> dict[str, str]:
    return {
        "image": "image",
        "anomaly map": "anomaly map",
        "ground truth": "ground truth",
        "prediction": f"prediction: map ≥ {level:.2f}",
    }


def verdict_line(score: float | None, threshold: float | None, threshold_source: str | None = None,
                 verdict: str | None = None) -> str:
    """The footer: image score, threshold and verdict in words."""
    if score is None:
        return ""
    if threshold_source:  # a 32-hex MLflow run id reads as its first 8 characters, as everywhere else
        threshold_source = re.sub(r"\b([0-9a-f]{8})[0-9a-f]{24}\b", r"\1", threshold_source)
    parts = [f"image score {score:.3f}"]
    if threshold is None:
        parts.append("no threshold, so no verdict")
    else:
        where = f" ({threshold_source})" if threshold_source and threshold_source != "user" else ""
        parts.append(f"threshold {threshold:.3f}{where}")
        parts.append(f"verdict: {(verdict or ('anomalous' if score >= threshold else 'normal')).upper()}")
    return _SEPARATOR.join(parts)


def overlay_picture(
    image: np.ndarray,
    heat: np.ndarray,
    level: float = CONTOUR_LEVEL,
    gt_mask: np.ndarray | None = None,
    footer: str = "",
) -> Image.Image:
    """The titled picture for an RGB uint8 image [S, S, 3] and a heat map [S, S] in [0, 1]."""
    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (h, w):
        raise ValueError(f"heat map {heat.shape} does not match the image {img.shape[:2]}")
    if h != w:
        raise ValueError(f"overlay pictures are drawn for square scored images, got {w}x{h}")
    layout = overlay_layout(h, gt_mask is not None)
    k = layout.scale
    big = _enlarge(img, k)
    big_heat = _enlarge(heat, k)
    blend = ((1 - HEAT_ALPHA) * big.astype(np.float32) + HEAT_ALPHA * heat_rgb(big_heat).astype(np.float32))
    content = {
        "image": big,
        "anomaly map": blend.round().clip(0, 255).astype(np.uint8),
        "prediction": draw_region(big, big_heat >= level, PRED_COLOUR, width=2),
    }
    if gt_mask is not None:
        content["ground truth"] = draw_region(big, _enlarge(np.asarray(gt_mask, dtype=bool), k), GT_COLOUR, width=2)

    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    titles = _panel_titles(level)
    for name, (x0, y0, x1, _) in layout.panels.items():
        canvas.paste(Image.fromarray(content[name], mode="RGB"), (x0, y0))
        draw.text(((x0 + x1) // 2, y0 - 4), titles[name], fill=TEXT_COLOUR, font=font, anchor="ms")
    _draw_colour_bar(canvas, draw, layout.colour_bar, level, font)
    if footer:
        fx0, fy0, fx1, fy1 = layout.footer
        lines = _wrap(footer, font, fx1 - fx0)
        draw.multiline_text(((fx0 + fx1) // 2, (fy0 + fy1) // 2), "\n".join(lines), fill=TEXT_COLOUR, font=font,
                            anchor="mm", align="center", spacing=3)
    return canvas


_SEPARATOR = "   |   "


def _wrap(text: str, font, width: int) -> list[str]:
    """The footer in lines that fit ``width``, broken between its ``|``-separated parts."""
    lines: list[str] = []
    for part in text.split(_SEPARATOR):
        candidate = f"{lines[-1]}{_SEPARATOR}{part}" if lines else part
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(part)
    return lines


def _draw_colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, box: Box, level: float, font) -> None:
    x0, y0, x1, y1 = box
    values = np.linspace(1.0, 0.0, y1 - y0, dtype=np.float32)[:, None].repeat(x1 - x0, axis=1)
    canvas.paste(Image.fromarray(heat_rgb(values), mode="RGB"), (x0, y0))
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=TEXT_COLOUR)
    for v in (0.0, 0.5, 1.0):
        y = round(y1 - 1 - v * (y1 - y0 - 1))
        draw.text((x1 + 3, y), f"{v:g}", fill=TEXT_COLOUR, font=font, anchor="lm")
    # The pixel level the prediction panel uses, as a marker across the bar.
    y = round(y1 - 1 - min(max(level, 0.0), 1.0) * (y1 - y0 - 1))
    draw.line((x0 - 4, y, x1 + 1, y), fill=PRED_COLOUR, width=2)


def save_overlay(path: Path, image: np.ndarray, heat: np.ndarray, level: float = CONTOUR_LEVEL,
                 gt_mask: np.ndarray | None = None, footer: str = "") -> Path:
    path = Path(path)
    picture = overlay_picture(image, heat, level, gt_mask, footer)
    with atomic_path(path) as tmp:  # creates the folder; a reader never sees half a picture
        picture.save(tmp, format="PNG", optimize=True)
    return path
