"""Tests for aaclip_core.evaluation.metrics against sklearn, hand-worked cases and slow references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from aaclip_core.evaluation.metrics import (
    UndefinedMetricError,
    aupro,
    auroc,
    average_precision,
    detection_metrics,
    f1_max,
    f1_max_threshold,
)

TOL = 1e-9


def _tied_data(rng: np.random.Generator, n: int, levels: int, positive_rate: float = 0.3):
    """Scores with many ties (rounded) that are mildly informative about the labels."""
    labels = rng.random(n) < positive_rate
    scores = np.floor((rng.random(n) + 0.4 * labels) * levels) / levels
    return scores, labels


# ------------------------------------------------------------------ hand-worked cases


def test_hand_worked_no_ties():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4 -> AUROC 0.75.
    assert auroc(scores, labels) == pytest.approx(0.75, abs=TOL)
    # Thresholds 0.8 (TP1 FP0, P=1), 0.4 (TP1 FP1), 0.35 (TP2 FP1, P=2/3), 0.1.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision(scores, labels) == pytest.approx(5 / 6, abs=TOL)
    # F1 = 2TP/(TP+FP+P): 0.8 -> 2/3, 0.4 -> 1/2, 0.35 -> 4/5, 0.1 -> 2/3.
    assert f1_max_threshold(scores, labels) == pytest.approx((0.8, 0.35), abs=TOL)


def test_hand_worked_with_ties():
    scores, labels = [0.5, 0.5, 0.2, 0.8], [1, 0, 0, 1]
    # ROC points (0,0) (0,.5) [t=.8] (.5,1) [t=.5, tie moves diagonally] (1,1) [t=.2].
    # Area = 0 + .5 * (.5 + 1) / 2 + .5 * 1 = 0.875.
    assert auroc(scores, labels) == pytest.approx(0.875, abs=TOL)
    # AP = 1/2 * 1 (t=.8) + 1/2 * 2/3 (t=.5, TP2 FP1) = 5/6.
    assert average_precision(scores, labels) == pytest.approx(5 / 6, abs=TOL)
    # F1: t=.8 -> 2/3, t=.5 -> 4/5, t=.2 -> 4/6.
    assert f1_max_threshold(scores, labels) == pytest.approx((0.8, 0.5), abs=TOL)


def test_perfect_and_inverted_classifiers():
    labels = [0, 0, 1, 1]
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert average_precision([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert f1_max([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    # Inverted: positives enter at t=.2 (TP1 of 3 predicted) and t=.1 (TP2 of 4).
    # AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12.
    assert average_precision([0.9, 0.8, 0.2, 0.1], labels) == pytest.approx(5 / 12, abs=TOL)


def test_constant_scores():
    # One threshold: ROC goes straight from (0,0) to (1,1); AP = prevalence.
    labels = np.array([0, 1, 0, 0, 1])
    scores = np.full(5, 0.3)
    assert auroc(scores, labels) == pytest.approx(0.5, abs=TOL)
    assert average_precision(scores, labels) == pytest.approx(0.4, abs=TOL)


# ------------------------------------------------------------------ sklearn equality


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_matches_sklearn_with_ties(seed: int, levels: int):
    rng = np.random.default_rng(seed)
    scores, labels = _tied_data(rng, 500 + 37 * seed, levels, positive_rate=0.1 + 0.12 * seed)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=TOL
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtypes_match_sklearn(dtype: torch.dtype):
    rng = np.random.default_rng(1)
    scores, labels = _tied_data(rng, 2000, 50)
    tensor = torch.as_tensor(scores).to(dtype)
    reference_scores = tensor.double().numpy()  # what the low-precision tensor holds
    assert auroc(tensor, torch.as_tensor(labels)) == pytest.approx(
        roc_auc_score(labels, reference_scores), abs=TOL
    )
    assert average_precision(tensor, torch.as_tensor(labels).float()) == pytest.approx(
        average_precision_score(labels, reference_scores), abs=TOL
    )


def test_integer_scores_and_any_shape():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 20, size=(10, 3, 7))
    labels = rng.integers(0, 2, size=(10, 3, 7))
    expected = roc_auc_score(labels.ravel(), scores.ravel())
    assert auroc(scores, labels) == pytest.approx(expected, abs=TOL)
    assert auroc(torch.from_numpy(scores).int(), torch.from_numpy(labels)) == pytest.approx(
        expected, abs=TOL
    )


def test_signed_zero_is_one_threshold():
    scores, labels = np.array([0.0, -0.0, 0.0, -0.0, 1.0]), np.array([1, 0, 0, 1, 0])
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=TOL
    )


@pytest.mark.parametrize("positive_rate", [0.02, 0.7])
def test_large_input_matches_sklearn(positive_rate: float):
    rng = np.random.default_rng(3)
    n = 1_000_000
    labels = rng.random(n) < positive_rate
    scores = (rng.random(n) + 0.2 * labels).astype(np.float32)
    scores[: n // 2] = np.round(scores[: n // 2], 3)  # half the data heavily tied
    result = detection_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)


# ------------------------------------------------------------------------------ F1 max


def _brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    best, best_threshold = -1.0, None
    for threshold in np.unique(scores)[::-1]:  # highest first, keep the first maximum
        f1 = f1_score(labels, scores >= threshold, zero_division=0.0)
        if f1 > best + 1e-15:
            best, best_threshold = f1, threshold
    return best, float(best_threshold)


@pytest.mark.parametrize("seed", range(8))
def test_f1_max_matches_brute_force(seed: int):
    rng = np.random.default_rng(seed)
    scores, labels = _tied_data(rng, 60 + seed * 11, levels=12 if seed % 2 else 1000)
    labels[0], labels[1] = True, False  # both classes present
    best, threshold = f1_max_threshold(scores, labels)
    expected_best, expected_threshold = _brute_force_f1_max(scores, labels)
    assert best == pytest.approx(expected_best, abs=TOL)
    assert threshold == pytest.approx(expected_threshold, abs=TOL)
    assert f1_max(scores, labels) == pytest.approx(expected_best, abs=TOL)
    assert detection_metrics(scores, labels)["f1_max"] == pytest.approx(expected_best, abs=TOL)


# --------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [False, False, False]])
def test_single_class_raises(labels):
    for metric in (auroc, average_precision, f1_max, f1_max_threshold, detection_metrics):
        with pytest.raises(UndefinedMetricError, match="single class"):
            metric([0.1, 0.5, 0.9], labels)


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [0, 1, 1], "same samples"),
        ([0.1, float("nan"), 0.3], [0, 1, 1], "NaN"),
        ([], [], "empty"),
        ([0.1, 0.2, 0.3], [0, 255, 0], "only 0 and 1"),
        ([0.1, 0.2, 0.3], [0, 0.5, 1], "only 0 and 1"),
    ],
)
def test_invalid_inputs_raise(scores, labels, message):
    with pytest.raises(ValueError, match=message) as raised:
        auroc(scores, labels)
    # Malformed input must not look like a merely undefined metric to callers.
    assert not isinstance(raised.value, UndefinedMetricError)


# ------------------------------------------------------------------------------ AUPRO


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Slow, literal AUPRO: one pass over the images per distinct threshold."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == region) for region in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append(predicted[normal].sum() / normal.sum())
        pros.append(np.mean([predicted[index][region].mean() for index, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = list(fprs[keep]), list(pros[keep])
    if not keep.all():
        j = int(np.argmax(~keep))
        x.append(limit)
        slope = (pros[j] - pros[j - 1]) / (fprs[j] - fprs[j - 1])
        y.append(pros[j - 1] + slope * (limit - fprs[j - 1]))
    return float(np.trapezoid(y, x) / limit)


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """One 4x5 image: region A = 1 pixel, region B = 3 pixels, 16 normal pixels."""
    mask = np.zeros((4, 5), dtype=bool)
    mask[0, 0] = True  # A
    mask[3, 2:5] = True  # B (not touching A, even diagonally)
    anomaly_map = np.full((4, 5), 0.1)
    anomaly_map[1, 1:5] = 0.5  # 4 normal pixels score 0.5, the other 12 score 0.1
    anomaly_map[0, 0] = 0.9
    anomaly_map[3, 2:5] = [0.9, 0.2, 0.2]
    return anomaly_map, mask


def test_aupro_hand_worked_two_regions():
    anomaly_map, mask = _two_region_case()
    # Curve: t=.9 -> (FPR 0, PRO (1 + 1/3)/2 = 2/3); t=.5 -> (4/16, 2/3);
    # t=.2 -> (.25, 1); t=.1 -> (1, 1).
    # Area on [0, .3] = .25 * 2/3 + .05 * 1 = 13/60; / .3 = 13/18.
    assert aupro(anomaly_map, mask) == pytest.approx(13 / 18, abs=TOL)
    # Area on [0, 1] = 1/6 + .75 = 11/12.
    assert aupro(anomaly_map, mask, fpr_limit=1.0) == pytest.approx(11 / 12, abs=TOL)
    # Limit .2 falls inside the flat segment (0, 2/3) -> (.25, 2/3): PRO is 2/3 throughout.
    assert aupro(anomaly_map, mask, fpr_limit=0.2) == pytest.approx(2 / 3, abs=TOL)


def test_aupro_perfect_and_constant_maps():
    _, mask = _two_region_case()
    assert aupro(mask.astype(np.float32), mask) == pytest.approx(1.0, abs=TOL)
    # Constant map: one threshold, the curve is the segment (0,0) -> (1,1), so the mean
    # of PRO = FPR over [0, .3] is .15.
    assert aupro(np.full(mask.shape, 0.7), mask) == pytest.approx(0.15, abs=TOL)


def test_aupro_uses_8_connectivity_within_each_image():
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal pair: one region
    masks[0, 3, 3] = True  # a second region
    maps = np.zeros((2, 5, 5))
    maps[0, 0, 0] = maps[0, 3, 3] = 1.0
    # t=1: PRO = (1/2 + 1)/2 = .75 at FPR 0, then (1, 1). Interpolated PRO at .3 is .825;
    # area = .3 * (.75 + .825)/2, normalised: .7875 (4-connectivity: 3 regions, 0.7167).
    assert aupro(maps, masks) == pytest.approx(0.7875, abs=TOL)
    # A region in image 1 at the same place must not merge with image 0's pixel.
    masks[1, 0, 0] = masks[1, 0, 1] = True
    assert aupro(maps, masks) == pytest.approx(_reference_aupro(maps, masks, 0.3), abs=TOL)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference(seed: int, limit: float):
    rng = np.random.default_rng(seed)
    noise = scipy.ndimage.gaussian_filter(rng.random((3, 16, 16)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    maps = np.round(rng.random((3, 16, 16)) + 0.5 * masks, 2)  # ties across pixels
    expected = _reference_aupro(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=TOL)
    as_tensors = aupro(torch.from_numpy(maps).float().unsqueeze(1), torch.from_numpy(masks), limit)
    expected_float32 = _reference_aupro(maps.astype(np.float32), masks, limit)
    assert as_tensors == pytest.approx(expected_float32, abs=TOL)


def test_aupro_approximate_thresholds():
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:6, 3:9] = masks[1, 10:18, 10:13] = masks[1, 0:2, 0:2] = True
    # Values on a dyadic grid of 9 levels: 9 evenly spaced thresholds hit every level
    # exactly, so the approximation must equal the exact curve.
    maps = np.floor(np.clip(rng.random(masks.shape) + 0.4 * masks, 0, 1) * 8) / 8
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0
    exact = aupro(maps, masks)
    assert aupro(maps, masks, num_thresholds=9) == pytest.approx(exact, abs=TOL)
    continuous = rng.random(masks.shape) + 0.4 * masks
    assert aupro(continuous, masks, num_thresholds=2000) == pytest.approx(
        aupro(continuous, masks), abs=1e-2
    )


@pytest.mark.parametrize(
    ("masks", "message"),
    [(np.zeros((4, 4)), "no anomalous region"), (np.ones((4, 4)), "no normal pixel")],
)
def test_aupro_undefined_raises(masks, message):
    with pytest.raises(UndefinedMetricError, match=message):
        aupro(np.zeros((4, 4)), masks)


@pytest.mark.parametrize(
    ("maps", "masks", "kwargs", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), {}, "same shape"),
        (np.zeros(4), np.zeros(4), {}, "must have shape"),
        (np.zeros((4, 4)), 255 * np.eye(4), {}, "only 0 and 1"),
        (np.zeros((4, 4)), np.eye(4), {"fpr_limit": 0.0}, "fpr_limit"),
        (np.zeros((4, 4)), np.eye(4), {"num_thresholds": 1}, "num_thresholds"),
    ],
)
def test_aupro_invalid_inputs_raise(maps, masks, kwargs, message):
    with pytest.raises(ValueError, match=message) as raised:
        aupro(maps, masks, **kwargs)
    assert not isinstance(raised.value, UndefinedMetricError)


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    rng = np.random.default_rng(11)
    scores, labels = _tied_data(rng, 100_000, 300)
    cpu = detection_metrics(scores, labels)
    cuda = detection_metrics(torch.from_numpy(scores).cuda(), torch.from_numpy(labels).cuda())
    assert cuda == pytest.approx(cpu, abs=TOL)
    noise = scipy.ndimage.gaussian_filter(rng.random((4, 32, 32)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.9)
    maps = rng.random(masks.shape).astype(np.float32) + masks
    for num_thresholds in (None, 100):
        on_cpu = aupro(maps, masks, num_thresholds=num_thresholds)
        maps_cuda, masks_cuda = torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda()
        on_cuda = aupro(maps_cuda, masks_cuda, num_thresholds=num_thresholds)
        assert on_cuda == pytest.approx(on_cpu, abs=TOL)
