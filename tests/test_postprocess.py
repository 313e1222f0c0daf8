"""The post-processor (aaclip_score.postprocess): the same numbers from torch tensors and
numpy arrays, from one class's ranges and from the exported graph's per-image rows; empty ranges give
zeros; the medical and industrial image scores; the display map clipped; no torch imported."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from aaclip_score.postprocess import (
    RANGE_KEYS,
    UNCALIBRATED,
    ClassCalibration,
    clip_for_display,
    display_map,
    image_score,
    minmax,
    normalise,
    ranges_rows,
)

CAL = ClassCalibration(map_min=-2.0, map_max=6.0, det_min=0.25, det_max=0.75, image_threshold=0.5)


@pytest.fixture
def raw():
    """Three raw maps [3, 4, 4] straddling CAL's map range, and their detection scores [3]."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 4, generator=g) * 4 + 2
    det = torch.tensor([0.1, 0.5, 0.9])
    return maps, det


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_torch_and_numpy_give_the_same_values(raw, domain):
    maps, det = raw
    t_maps, t_score = CAL.apply(maps, det, domain)
    n_maps, n_score = CAL.apply(maps.numpy(), det.numpy(), domain)
    assert isinstance(n_maps, np.ndarray) and n_maps.dtype == np.float32 and n_score.dtype == np.float32
    assert np.array_equal(t_maps.numpy(), n_maps) and np.array_equal(t_score.numpy(), n_score)
    assert np.array_equal(display_map(maps[0], CAL).numpy(), display_map(maps[0].numpy(), CAL))
    assert np.array_equal(display_map(maps[0]).numpy(), display_map(maps[0].numpy()))


def test_minmax_is_the_formula_in_the_inputs_precision():
    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    assert minmax(x, 1.0, 5.0).tolist() == [0.0, 0.25, 1.0]
    assert minmax(x).tolist() == [0.0, 0.25, 1.0]  # its own range
    assert minmax(x, 3.0, 4.0).tolist() == [-2.0, -1.0, 2.0]  # not clipped
    assert minmax(x, np.float64(1.0), np.float64(5.0)).dtype == np.float32
    assert minmax(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64), 1.0, 5.0).dtype == torch.float64


def test_empty_range_gives_zeros_without_warnings():
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(minmax(x, 3.0, 3.0), np.zeros_like(x))
        assert np.array_equal(minmax(np.full(4, 7.0, dtype=np.float32)), np.zeros(4, dtype=np.float32))
        rows = np.array([[3.0, 3.0], [0.0, 2.0]], dtype=np.float32)  # per-image: the first range is empty
        assert minmax(x, rows[:, 0, None], rows[:, 1, None]).tolist() == [[0.0, 0.0], [1.5, 2.0]]
    assert torch.equal(minmax(torch.tensor(x), 3.0, 2.0), torch.zeros(2, 2))


def test_medical_scores_the_map_peak_industrial_averages_it_with_the_detection():
    norm_maps = np.array([[[0.2, 0.8]], [[0.4, 0.1]]], dtype=np.float32)
    norm_det = np.array([0.6, 0.0], dtype=np.float32)
    assert image_score(norm_maps, norm_det, "medical").tolist() == pytest.approx([0.8, 0.4])
    assert image_score(norm_maps, norm_det, "industrial").tolist() == pytest.approx([0.7, 0.2])


def test_uncalibrated_is_the_formula_on_raw_values_exactly(raw):
    maps, det = raw
    norm, score = UNCALIBRATED.apply(maps, det, "industrial")
    assert torch.equal(norm, maps)
    assert torch.equal(score, 0.5 * maps.flatten(1).max(dim=1).values + 0.5 * det)


def test_display_map_is_clipped_to_the_unit_interval(raw):
    maps, _ = raw
    heat = display_map(maps[0].numpy(), CAL)
    norm = minmax(maps[0].numpy(), CAL.map_min, CAL.map_max)
    assert norm.min() < 0 or norm.max() > 1  # the fixture straddles the range, so clipping matters
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.array_equal(heat, np.clip(norm, 0.0, 1.0))
    assert np.array_equal(clip_for_display(norm), heat)
    own = display_map(maps[0].numpy())  # uncalibrated: the map's own range
    assert own.min() == 0.0 and own.max() == 1.0


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_per_image_rows_score_as_each_class_alone(raw, domain):
    """The exported graph's path (rows gathered per image) equals each class's own calibration."""
    maps, det = raw
    tables = {"a": CAL.as_dict(), "b": {"map_min": 1.0, "map_max": 1.0, "det_min": 0.0, "det_max": 2.0}}
    classes = ["a", "b", "c"]  # c has no calibration: the identity ranges
    rows = torch.tensor(ranges_rows(tables, classes))
    assert rows[2].tolist() == [UNCALIBRATED.as_dict()[k] for k in RANGE_KEYS]
    norm, score = normalise(maps, det, rows, domain)
    for i, c in enumerate(classes):
        one = ClassCalibration.from_dict(tables[c]) if c in tables else UNCALIBRATED
        alone_maps, alone_score = one.apply(maps[i:i + 1], det[i:i + 1], domain)
        assert torch.equal(norm[i], alone_maps[0]) and torch.equal(score[i], alone_score[0])
    assert torch.equal(norm[1], torch.zeros(4, 4))  # b's empty map range


def test_calibration_round_trips_through_plain_numbers():
    assert ClassCalibration.from_dict(CAL.as_dict()) == CAL
    assert "image_f1_max" not in CAL.as_dict()
    assert ClassCalibration.ranges_of(np.array([[1.0, 3.0]]), np.array([0.5, 0.2])).bounds == (1.0, 3.0, 0.2, 0.5)


def test_numpy_post_processing_runs_where_torch_cannot_be_imported():
    """The pictures and the scorer of exported files use it without torch: importing torch fails here."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from aaclip_score.postprocess import ClassCalibration, display_map
cal = ClassCalibration(0.0, 2.0, 0.0, 1.0)
raw = np.array([[[0.0, 1.0], [2.0, 4.0]]], dtype=np.float32)
print(float(cal.apply(raw, np.array([0.5], dtype=np.float32), 'industrial')[1][0]), float(display_map(raw[0], cal).max()))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1.25", "1.0"]
