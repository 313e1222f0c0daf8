"""The post-processor: the one place where raw anomaly maps and detection scores become the scale
`aaclip test` reports (SPEC §5), the image score and the map the pictures show.

`test` min-max normalises each class's raw pixel maps and detection scores over the class's test set
and scores an image as ``0.5 * max(normalised map) + 0.5 * normalised det`` (industrial) or
``max(normalised map)`` (medical). A :class:`ClassCalibration` keeps one class's ranges and its
F1-optimal image threshold; applying it to one new image reproduces that image's test score exactly
(`predict`, the exported graph), because every caller goes through :func:`normalise`. A class without
calibration is scored with :data:`UNCALIBRATED`, the identity ranges (0, 1): ``(x - 0) / (1 - 0)`` is
``x`` exactly, so its score is the same formula on the raw values. Normalised values are not clipped,
so a new image can score below 0 or above 1; only the map the pictures show is clipped to [0, 1]
(:func:`display_map`).

Everything here works alike on torch tensors and numpy arrays, and the exported graph traces these
same functions into ONNX. It imports no torch (a tensor's own module is looked up only when one is
passed), so the pictures and the torch-free scorer (`aaclip_score`, this module's home) use it too;
`aaclip_score.postprocess` imports it from here. Fitting a calibration to a test set (the
F1-optimal threshold) needs the metrics and is `aaclip_core.evaluation.calibration.fit_class_calibration`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The order of a ranges row (the exported graph's per-class table [C, 4]).
RANGE_KEYS = ("map_min", "map_max", "det_min", "det_max")


def _is_numpy(x) -> bool:
    return isinstance(x, np.ndarray | np.generic)


def _array_module(x):
    """numpy for arrays, torch for tensors: the module that made the tensor, already imported by
    whoever made it (looked up, never imported here: the scorer has no torch)."""
    if _is_numpy(x):
        return np
    return sys.modules[type(x).__module__.split(".")[0]]


def _like(x, value):
    """A number as a scalar of x's dtype (and device), so the arithmetic happens in x's precision;
    bounds that are arrays or tensors already (the graph's per-image ranges) are used as they are."""
    if not isinstance(value, int | float | np.generic):
        return value
    return x.dtype.type(value) if _is_numpy(x) else x.new_tensor(value)


def minmax(x, lo=None, hi=None):
    """``(x - lo) / (hi - lo)``, lo/hi defaulting to x's own min and max; zeros where hi <= lo (a
    constant map carries no ranking). lo/hi are numbers, or per-image bounds that broadcast against x
    (the exported graph's, where the choice is a traced ``where``). Not clipped: a new image can fall
    outside a test set's range."""
    xp = _array_module(x)
    lo = x.min() if lo is None else _like(x, lo)
    hi = x.max() if hi is None else _like(x, hi)
    nonempty = hi > lo
    if nonempty.ndim == 0:  # one range for all of x: no zeros the size of a test set to choose from
        return (x - lo) / (hi - lo) if nonempty else xp.zeros_like(x)
    # Per-image ranges: an empty one divides by zero, and where() drops those values (numpy need not warn).
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.where(nonempty, (x - lo) / (hi - lo), xp.zeros_like(x))


def _per_image_max(maps):
    """[N] the peak of each map of [N, ...]."""
    if _is_numpy(maps):
        return maps.reshape(len(maps), -1).max(axis=1)
    return maps.flatten(1).max(dim=1).values


def image_score(norm_maps, norm_det, domain: str):
    """Image scores [N] from normalised maps [N, ...] and normalised detection scores [N]."""
    peak = _per_image_max(norm_maps)
    return peak if domain == "medical" else 0.5 * peak + 0.5 * norm_det


def normalise(raw_maps, raw_det, ranges, domain: str):
    """(normalised maps [N, ...], image scores [N]) of raw maps and detection scores [N]. ``ranges``:
    (map_min, map_max, det_min, det_max) as numbers (one class's, :attr:`ClassCalibration.bounds`),
    or rows [N, 4] in :data:`RANGE_KEYS` order, one per image (the exported graph, whose batch mixes
    classes)."""
    maps = minmax(raw_maps, _bound(ranges, 0, raw_maps), _bound(ranges, 1, raw_maps))
    det = minmax(raw_det, _bound(ranges, 2, raw_det), _bound(ranges, 3, raw_det))
    return maps, image_score(maps, det, domain)


def _bound(ranges, k: int, x):
    """Bound ``k`` of ``ranges``: a number, or the column of per-image rows shaped to broadcast
    against x [N, ...]."""
    if isinstance(ranges, tuple):
        return ranges[k]
    return ranges[(slice(None), k) + (None,) * (x.ndim - 1)]


def display_map(raw_map, cal: ClassCalibration | None = None):
    """What the pictures show of one raw map: on its class's calibration scale (exactly the map the
    test's metrics saw), or without one on the map's own range (where the image is most anomalous,
    not how much); clipped to [0, 1]."""
    lo, hi = (None, None) if cal is None else (cal.map_min, cal.map_max)
    return clip_for_display(minmax(raw_map, lo, hi))


def clip_for_display(norm_map):
    """A map already on the calibration's scale as the pictures show it: clipped to [0, 1]."""
    return _array_module(norm_map).clip(norm_map, 0.0, 1.0)


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
    def ranges_of(cls, raw_maps, raw_det) -> ClassCalibration:
        """The ranges of a class's whole test set (what `test` normalises with), no threshold."""
        return cls(float(raw_maps.min()), float(raw_maps.max()), float(raw_det.min()), float(raw_det.max()))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """The ranges in :data:`RANGE_KEYS` order."""
        return self.map_min, self.map_max, self.det_min, self.det_max

    def apply(self, raw_maps, raw_det, domain: str):
        """(normalised maps, image scores) of raw maps [N, ...] and detection scores [N]."""
        return normalise(raw_maps, raw_det, self.bounds, domain)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassCalibration:
        return cls(**{k: (None if d.get(k) is None else float(d[k])) for k in cls.__dataclass_fields__ if k in d})


UNCALIBRATED = ClassCalibration(0.0, 1.0, 0.0, 1.0)


def ranges_rows(tables: Mapping[str, Mapping[str, float]], classes: Iterable[str]) -> list[list[float]]:
    """[C, 4] ranges rows (:data:`RANGE_KEYS`) of each class's calibration table (as numbers), the
    :data:`UNCALIBRATED` ranges for a class without one: the exported graph's table, from which it
    gathers each image's row for :func:`normalise`."""
    identity = UNCALIBRATED.as_dict()
    return [[float({**identity, **tables.get(c, {})}[k]) for k in RANGE_KEYS] for c in classes]
