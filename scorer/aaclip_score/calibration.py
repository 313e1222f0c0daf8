"""The record of one test's calibration: what it was computed on and each class's ranges and
F1-optimal threshold, as `test` writes it and `predict`, the pictures and exported files read it.

Data only (no torch): fitting a calibration to a test set and choosing which test's calibration
scores a set of images is `aaclip_core.evaluation.calibration`, which imports this class from here.
What a calibration does to maps and scores is the post-processor, :mod:`aaclip_score.postprocess`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from aaclip_score.postprocess import RANGE_KEYS, ClassCalibration


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
