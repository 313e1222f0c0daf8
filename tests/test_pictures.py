"""Anomaly-map pictures: titled panels at a known layout, regions drawn exactly where they are."""

from __future__ import annotations

import numpy as np
import pytest
from aaclip_score.overlay import (
    GT_COLOUR,
    PRED_COLOUR,
    mask_boundary,
    overlay_layout,
    overlay_picture,
    verdict_line,
)
from PIL import Image

from aaclip_core.data.synthetic import render_sample, sample_entropy


def _crop(picture: Image.Image, box) -> np.ndarray:
    return np.asarray(picture.crop(box))


def _scene(side: int = 56):
    image, mask = render_sample("disc", "spot", side, sample_entropy(3, "disc", "spot", 0))
    rng = np.random.default_rng(0)
    heat = np.clip(rng.random((side, side)).astype(np.float32) * 0.8 + 0.2 * mask, 0, 1)
    return image, mask, heat


@pytest.mark.parametrize("with_gt", [True, False])
def test_overlay_size_and_titled_panels(with_gt):
    image, mask, heat = _scene()
    footer = verdict_line(0.734, 0.512, "auto: F1-max on MVTec test run abcd1234")
    picture = overlay_picture(image, heat, 0.5, mask if with_gt else None, footer)
    layout = overlay_layout(56, with_gt)
    assert picture.size == layout.size
    names = ["image", "anomaly map", *(["ground truth"] if with_gt else []), "prediction"]
    assert list(layout.panels) == names
    k = layout.scale
    assert k * 56 >= 224
    for name, (x0, y0, x1, y1) in layout.panels.items():
        assert (x1 - x0, y1 - y0) == (56 * k, 56 * k)
        # Each panel has a title: dark text pixels in the strip above it.
        title = _crop(picture, (x0, max(0, y0 - 20), x1, y0))
        assert (title.min(axis=2) < 100).sum() > 20, name
    # The image panel is the scored image, enlarged.
    assert (_crop(picture, layout.panels["image"]) == np.repeat(np.repeat(image, k, 0), k, 1)).all()
    # The colour bar runs from red-ish (1) at the top to blue (0) at the bottom; the footer has text.
    x0, y0, x1, y1 = layout.colour_bar
    bar = _crop(picture, (x0 + 2, y0 + 2, x1 - 2, y1 - 2)).astype(int)
    assert bar[0, 0, 0] > bar[0, 0, 2] and bar[-1, 0, 2] > bar[-1, 0, 0]
    assert (_crop(picture, layout.footer).min(axis=2) < 100).sum() > 50
    assert "image score 0.734" in footer and "threshold 0.512" in footer and "ANOMALOUS" in footer


def test_predicted_pixels_drawn_are_exactly_those_above_the_level():
    image, mask, heat = _scene()
    level = 0.6
    picture = overlay_picture(image, heat, level, mask)
    layout = overlay_layout(56, True)
    k = layout.scale
    big = np.repeat(np.repeat(image, k, 0), k, 1)
    above = np.repeat(np.repeat(heat >= level, k, 0), k, 1)
    pred = _crop(picture, layout.panels["prediction"])
    changed = (pred != big).any(axis=2)
    assert above.any() and (~above).any()
    assert (changed == above).all()  # drawn = exactly the pixels at or above the level
    assert (pred[mask_boundary(above, 2)] == PRED_COLOUR).all()
    gt = _crop(picture, layout.panels["ground truth"])
    big_mask = np.repeat(np.repeat(mask, k, 0), k, 1)
    assert ((gt != big).any(axis=2) == big_mask).all()
    assert (gt[mask_boundary(big_mask, 2)] == GT_COLOUR).all()


def test_a_map_mostly_above_the_level_is_not_a_frame_around_the_picture():
    image, mask, _ = _scene()
    heat = np.where(mask, 0.1, 0.9).astype(np.float32)  # everything above the level except the defect
    picture = overlay_picture(image, heat, 0.5)
    layout = overlay_layout(56, False)
    pred = _crop(picture, layout.panels["prediction"])
    border = np.concatenate([pred[0], pred[-1], pred[:, 0], pred[:, -1]])
    # The picture's border is filled (translucent), never outlined in the solid colour ...
    assert not (border == PRED_COLOUR).all(axis=1).any()
    # ... and the defect, below the level, is left exactly as the image shows it.
    k = layout.scale
    big = np.repeat(np.repeat(image, k, 0), k, 1)
    below = np.repeat(np.repeat(mask, k, 0), k, 1)
    assert (pred[below] == big[below]).all()


def test_mask_boundary_stays_inside_and_ignores_the_picture_edge():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    edge = mask_boundary(mask)
    assert edge.sum() == 12 and not edge[3:5, 3:5].any() and (edge <= mask).all()
    full = np.ones((6, 6), bool)
    assert not mask_boundary(full).any()
