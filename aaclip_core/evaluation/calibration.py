"""Calibrations of tests: fitting a class's ranges and F1-optimal threshold to its test set, and
choosing which test's calibration scores a set of images. The record of a whole test's calibration
(what it was computed on, the classes) that carries the scale to `predict` and the pictures is
:class:`aaclip_score.calibration.Calibration`, imported here.

What a calibration does to maps and scores is the post-processor,
:mod:`aaclip_score.postprocess`.
"""

from __future__ import annotations

import torch

# The record itself is data without torch, so the scorer reads it too: its home is aaclip_score.
from aaclip_score.calibration import Calibration
from aaclip_score.postprocess import ClassCalibration

from aaclip_core.evaluation import metrics

__all__ = ["Calibration", "CalibrationChoice", "choose_calibration", "fit_class_calibration"]


def fit_class_calibration(raw_maps: torch.Tensor, raw_det: torch.Tensor, labels: torch.Tensor, domain: str
                          ) -> ClassCalibration:
    """The ranges of a class's test set and the F1-optimal threshold of its image scores (ranges
    only when the test set has one label)."""
    ranges = ClassCalibration.ranges_of(raw_maps, raw_det)
    _, score = ranges.apply(raw_maps, raw_det, domain)
    try:
        f1, threshold = metrics.f1_max_threshold(score, labels)
    except metrics.UndefinedMetricError:
        return ranges
    return ClassCalibration(*ranges.bounds, float(threshold), float(f1))


# ------------------------------------------------------------------------------------------ choosing one


class CalibrationChoice:
    """Which calibration scores a set of images, or why none does (``note``)."""

    def __init__(self, calibration: Calibration | None, note: str | None = None):
        self.calibration, self.note = calibration, note


def _matches(cal: Calibration, wanted: str) -> bool:
    w = wanted.strip()
    return bool(cal.test_run_id and cal.test_run_id.startswith(w)) or cal.dataset.lower() == w.lower()


def _listing(cals: list[Calibration]) -> str:
    return "; ".join(f"{c.label} with classes {', '.join(sorted(c.classes)) or 'none'}" for c in cals)


def choose_calibration(candidates: list[Calibration], classes: set[str], wanted: str | None) -> CalibrationChoice:
    """The calibration for images of ``classes``, from the tests of one model (newest first).

    ``wanted`` (``--calibration``) names a test run (id or unique prefix) or a test dataset. Without
    it the choice must be unambiguous: the one test dataset whose calibration covers every class
    of the images, and never a test on the training data. When none or several fit, the result
    has no calibration and a note naming the tests and how to choose.
    """
    if wanted:
        exact = [c for c in candidates if c.test_run_id == wanted.strip()]
        hits = exact or [c for c in candidates if _matches(c, wanted)]
        if hits and len({c.dataset.lower() for c in hits}) == 1:
            return CalibrationChoice(hits[0])  # several tests of one dataset: the newest
        reason = "matches tests of several datasets" if hits else "matches no test of this model"
        return CalibrationChoice(None, f"--calibration {wanted} {reason} (tests: {_listing(candidates) or 'none'})")
    latest: dict[str, Calibration] = {}
    for c in candidates:  # newest first: keep the newest per test dataset
        latest.setdefault(c.dataset.lower(), c)
    covering = [c for c in latest.values() if classes and classes <= set(c.classes)] if classes else list(latest.values())
    usable = [c for c in covering if not c.training_data]
    if len(covering) == 1 and usable:
        return CalibrationChoice(usable[0])
    if not candidates:
        return CalibrationChoice(None, "the model has no finished test with a calibration")
    how = "pass --calibration TEST_RUN_ID (or the test dataset's name) to say which test the images belong to"
    if not covering:
        return CalibrationChoice(None, f"no test covers the images' classes ({', '.join(sorted(classes))}); tests: "
                                       f"{_listing(list(latest.values()))}")
    if not usable:
        return CalibrationChoice(None, f"the only test covering the images is on the model's training data "
                                       f"({_listing(covering)}), which is never used silently; {how}, or test "
                                       "on the images' own dataset")
    return CalibrationChoice(None, f"several tests could calibrate these images ({_listing(covering)}); {how}")
