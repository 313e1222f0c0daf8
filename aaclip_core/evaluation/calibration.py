"""Score calibration: the one place where raw anomaly maps and detection scores become the scale
`aaclip test` reports (SPEC §5), and the object that carries that scale to `predict` and the pictures.

`test` min-max normalises each class's raw pixel maps and detection scores over the class's test set
and scores an image as ``0.5 * max(normalised map) + 0.5 * normalised det`` (industrial) or
``max(normalised map)`` (medical). A :class:`Calibration` keeps those per-class ranges and the
F1-optimal image threshold, with the test (dataset, run, checkpoint, same-dataset flag) they came
from; applying it to one new image reproduces that image's test score exactly, because both go
through :func:`~aaclip_core.evaluation.scale.minmax` and :func:`image_score`. Normalised values are not clipped, so a new
image can score below 0 or above 1; only pictures clip them to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from aaclip_core.evaluation import metrics
from aaclip_core.evaluation.scale import minmax


def image_score(norm_maps: torch.Tensor, norm_det: torch.Tensor, domain: str) -> torch.Tensor:
    """Image scores [N] from normalised maps [N, ...] and normalised detection scores [N]."""
    pmax = norm_maps.flatten(1).max(dim=1).values
    return pmax if domain == "medical" else 0.5 * pmax + 0.5 * norm_det


@dataclass(frozen=True)
class ClassCalibration:
    """One class's raw ranges over its test set, and its F1-optimal image threshold (None when the
    test set had one label only)."""

    map_min: float
    map_max: float
    det_min: float
    det_max: float
    image_threshold: float | None = None
    image_f1_max: float | None = None

    @classmethod
    def ranges_of(cls, raw_maps: torch.Tensor, raw_det: torch.Tensor) -> ClassCalibration:
        """The ranges of a class's whole test set (what `test` normalises with), no threshold."""
        return cls(float(raw_maps.min()), float(raw_maps.max()), float(raw_det.min()), float(raw_det.max()))

    @classmethod
    def fit(cls, raw_maps: torch.Tensor, raw_det: torch.Tensor, labels: torch.Tensor, domain: str) -> ClassCalibration:
        """The ranges of a class's test set and the F1-optimal threshold of its image scores."""
        ranges = cls.ranges_of(raw_maps, raw_det)
        _, score = ranges.apply(raw_maps, raw_det, domain)
        try:
            f1, threshold = metrics.f1_max_threshold(score, labels)
        except metrics.UndefinedMetricError:
            return ranges
        return cls(ranges.map_min, ranges.map_max, ranges.det_min, ranges.det_max, float(threshold), float(f1))

    def apply(self, raw_maps: torch.Tensor, raw_det: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised maps, image scores) of raw maps [N, ...] and detection scores [N]."""
        maps = minmax(raw_maps, self.map_min, self.map_max)
        det = minmax(raw_det, self.det_min, self.det_max)
        return maps, image_score(maps, det, domain)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassCalibration:
        return cls(**{k: (None if d.get(k) is None else float(d[k])) for k in cls.__dataclass_fields__ if k in d})


def uncalibrated_score(raw_map: torch.Tensor, raw_det: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(display map in [0, 1], image score) of one image with no calibration: the score formula on
    the raw values (not on the test scale), the map normalised by its own range."""
    return minmax(raw_map), image_score(raw_map[None], raw_det.reshape(1), domain)[0]


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
    return all(isinstance(d.get(k), int | float) and math.isfinite(d[k])
               for k in ("map_min", "map_max", "det_min", "det_max"))


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
