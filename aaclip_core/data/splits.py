"""Deterministic subsets: k-shot training sets and stratified validation splits.

Selections depend only on the seed and the set of samples (never their input order), and
each (class, label) group draws from its own random stream, so adding a class to a dataset
leaves the selection of the other classes unchanged.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from aaclip_core.data.samples import ANOMALOUS, NORMAL, Sample, sort_samples
from aaclip_core.errors import ConfigError, DataError


def _groups(samples: Sequence[Sample]) -> dict[tuple[str, int], list[Sample]]:
    groups: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for sample in sort_samples(samples):
        groups[(sample.class_name, sample.label)].append(sample)
    return groups


def _permutation(seed: int, class_name: str, label: int, n: int) -> np.ndarray:
    # crc32 rather than hash(): str hashes are salted per process.
    # SeedSequence rejects negative entropy; wrap so any int seed is usable.
    entropy = [seed % 2**64, zlib.crc32(class_name.encode("utf-8")), label]
    stream = np.random.default_rng(entropy)
    return stream.permutation(n)


def k_shot(samples: Sequence[Sample], k: int, seed: int) -> list[Sample]:
    """Pick ``k`` images per class: k // 2 normal, the rest (one more for odd k) anomalous."""
    if k < 1:
        raise ConfigError(f"k-shot needs k >= 1 images per class, got k={k}.")
    wanted = {NORMAL: k // 2, ANOMALOUS: k - k // 2}
    groups = _groups(samples)
    chosen: list[Sample] = []
    for class_name in sorted({name for name, _ in groups}):
        have = {label: len(groups.get((class_name, label), [])) for label in wanted}
        if any(have[label] < wanted[label] for label in wanted):
            raise DataError(
                f"Class {class_name!r} has {have[NORMAL]} normal and {have[ANOMALOUS]} anomalous "
                f"images, but {k}-shot needs {wanted[NORMAL]} normal and {wanted[ANOMALOUS]} "
                "anomalous. Lower k or add images to that class."
            )
        for label, count in wanted.items():
            group = groups.get((class_name, label), [])
            order = _permutation(seed, class_name, label, len(group))[:count]
            chosen += [group[j] for j in order]
    return sort_samples(chosen)


def train_val_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val), stratified by (class, label).

    Each group sends round(n * val_fraction) images to validation, capped so that every group
    with at least two images keeps one for training (a single image always stays in training).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"Validation fraction must be in [0, 1), got {val_fraction}.")
    train: list[Sample] = []
    val: list[Sample] = []
    for (class_name, label), group in _groups(samples).items():
        n_val = min(round(len(group) * val_fraction), len(group) - 1)
        order = _permutation(seed, class_name, label, len(group))
        val += [group[j] for j in order[:n_val]]
        train += [group[j] for j in order[n_val:]]
    return sort_samples(train), sort_samples(val)
