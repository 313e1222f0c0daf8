"""Calibrations of tests: fitting a class's ranges and F1-optimal threshold to its test set, the
record of a whole test's calibration (what it was computed on, the classes) that carries the scale to
`predict` and the pictures, and choosing which test's calibration scores a set of images.

What a calibration does to maps and scores is the post-processor,
:mod:`aaclip_core.evaluation.postprocess`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from aaclip_core.evaluation import metrics
from aaclip_core.evaluation.postprocess import RANGE_KEYS, ClassCalibration


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


@dataclass
class Calibration:
    """The per-class calibration of one test: what it was computed on, and the classes.

    ``test_run_id`` is None for a test run without a tracking store (``aaclip test --model DIR``).
    ``training_data``: the test ran on the model's training data (allowed only when asked for); such
    a calibration is never picked automatically.
    """

    dataset: str
    test_run_id: str | None
    checkpoint: str | None
    training_data: bool
    classes: dict[str, ClassCalibration] = field(default_factory=dict)
    # class -> the prompt name the test used (empty for tests that predate recorded names)
    prompt_names: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        where = f"test run {self.test_run_id}" if self.test_run_id else "a test without a tracking store"
        return f"auto: F1-max on {self.dataset} {where}"

    @property
    def label(self) -> str:
        """How a message names it: the test run (or 'local test') and its dataset."""
        who = self.test_run_id or "local test"
        return f"{who} ({self.dataset}{', the training data' if self.training_data else ''})"

    def tables(self) -> dict[str, dict[str, float]]:
        """class -> its calibration as plain numbers (what exported graphs and sidecars hold)."""
        return {c: v.as_dict() for c, v in sorted(self.classes.items())}

    def threshold(self, class_name: str) -> float | None:
        c = self.classes.get(class_name)
        return None if c is None else c.image_threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "test_run_id": self.test_run_id,
            "checkpoint": self.checkpoint,
            "training_data": self.training_data,
            "classes": {c: v.as_dict() for c, v in sorted(self.classes.items())},
            "prompt_names": dict(sorted(self.prompt_names.items())),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            dataset=str(d.get("dataset", "?")),
            test_run_id=d.get("test_run_id"),
            checkpoint=d.get("checkpoint"),
            training_data=bool(d.get("training_data", False)),
            classes={c: ClassCalibration.from_dict(v) for c, v in (d.get("classes") or {}).items()
                     if _finite_ranges(v)},
            prompt_names=dict(d.get("prompt_names") or {}),
        )


def _finite_ranges(d: dict) -> bool:
    return all(isinstance(d.get(k), int | float) and math.isfinite(d[k]) for k in RANGE_KEYS)


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
