"""The `Sample` record every dataset layout is indexed into, plus checks on lists of them.

Indexing (see `layouts`) only looks at file names; `validate_samples` is the separate, slower
pass that opens files, so a CLI can index a big dataset quickly and validate it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aaclip_score.images import UnreadableImage, read_grey, read_size

from aaclip_core.errors import DataError

NORMAL = 0
ANOMALOUS = 1
NORMAL_DEFECT = "good"

# Enough to locate the first problems without flooding the terminal on a badly broken dataset.
_MAX_REPORTED_PROBLEMS = 3


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``mask_path`` is None when there is no pixel annotation: for a normal image that means an
    all-zero mask; for an anomalous image (only the ``folder`` and ``jsonl`` layouts allow it) it
    means the defect location is unknown, and `AnomalyDataset` still yields an all-zero mask.
    """

    image_path: Path
    label: int
    class_name: str
    mask_path: Path | None
    defect: str = NORMAL_DEFECT

    def __post_init__(self) -> None:
        # A wrong label silently corrupts metrics, so reject it where the record is built.
        if self.label not in (NORMAL, ANOMALOUS):
            raise DataError(
                f"Image {self.image_path} has label {self.label!r}; labels must be 0 (normal) or "
                "1 (anomalous). Fix the label in the dataset metadata."
            )


def sort_samples(samples: Iterable[Sample]) -> list[Sample]:
    """Deterministic order (class, then path) so runs and metric tables are reproducible."""
    return sorted(samples, key=lambda s: (s.class_name, str(s.image_path)))


def class_names_of(samples: Iterable[Sample]) -> list[str]:
    return sorted({s.class_name for s in samples})


def select_classes(samples: Sequence[Sample], classes: Sequence[str] | None) -> list[Sample]:
    """Keep the samples of ``classes`` (all samples when None), in their original order."""
    if classes is None:
        return list(samples)
    available = class_names_of(samples)
    unknown = sorted(set(classes) - set(available))
    if unknown:
        raise DataError(
            f"Class(es) {', '.join(unknown)} are not in the dataset. Available classes: "
            f"{', '.join(available) or '(none)'}. Choose classes from that list."
        )
    wanted = set(classes)
    return [s for s in samples if s.class_name in wanted]


def _read_mask(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a mask as a boolean array (any non-zero grey value is anomalous) and its size.

    Converting to "L" first makes 1-bit, palette and RGB masks behave alike, and matches the
    ``!= 0`` rule `AnomalyDataset` applies.
    """
    mask = read_grey(path)
    return np.asarray(mask) != 0, mask.size


def _problem_of(sample: Sample) -> str | None:
    image_path, mask_path = sample.image_path, sample.mask_path
    if not image_path.is_file():
        return f"image {image_path} does not exist"
    try:
        size = read_size(image_path)
    except UnreadableImage as exc:
        return f"image {image_path} cannot be read ({exc.reason})"
    if mask_path is None:
        return None
    if not mask_path.is_file():
        return f"mask {mask_path} of image {image_path} does not exist"
    try:
        mask, mask_size = _read_mask(mask_path)
    except UnreadableImage as exc:
        return f"mask {mask_path} cannot be read ({exc.reason})"
    if mask_size != size:
        return (
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} pixels but image {image_path} "
            f"is {size[0]}x{size[1]}"
        )
    if sample.label == NORMAL and mask.any():
        return (
            f"image {image_path} is labelled normal but its mask {mask_path} marks anomalous pixels"
        )
    if sample.label == ANOMALOUS and not mask.any():
        return f"image {image_path} is labelled anomalous but its mask {mask_path} is all zero"
    return None


def find_problems(samples: Sequence[Sample]) -> list[str]:
    """Every problem `validate_samples` would report, one sentence each."""
    return [p for p in map(_problem_of, samples) if p is not None]


def validate_samples(samples: Sequence[Sample]) -> None:
    """Open every image and mask once and raise `DataError` describing the first problems.

    Checks: the image exists and has a readable header, the mask (when given) matches the image
    size, and the label agrees with the mask (normal = no anomalous pixel, anomalous = some).
    """
    if not samples:
        raise DataError(
            "The dataset contains no images. Check the dataset root, layout and class selection."
        )
    problems = find_problems(samples)
    if not problems:
        return
    shown = "; ".join(problems[:_MAX_REPORTED_PROBLEMS])
    more = len(problems) - _MAX_REPORTED_PROBLEMS
    suffix = f" (and {more} more problem(s))" if more > 0 else ""
    raise DataError(
        f"The dataset failed validation: {shown}{suffix}. Fix or remove these files and re-run."
    )
