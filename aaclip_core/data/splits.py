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


def k_shot(samples: Sequence[Sample], k: int, seed: int, setting: str = "k") -> list[Sample]:
    """Pick ``k`` images per class: k // 2 normal, the rest (one more for odd k) anomalous.
    ``setting`` names where k comes from (e.g. ``data.train.shot``) in error messages."""
    if k < 1:
        raise ConfigError(f"k-shot needs k >= 1 images per class, got {setting} = {k}.")
    wanted = {NORMAL: k // 2, ANOMALOUS: k - k // 2}
    groups = _groups(samples)
    classes = sorted({name for name, _ in groups})
    have = {c: {label: len(groups.get((c, label), [])) for label in wanted} for c in classes}
    short = [c for c in classes if any(have[c][label] < wanted[label] for label in wanted)]
    if short:
        listing = ", ".join(f"{c!r} {have[c][NORMAL]} normal + {have[c][ANOMALOUS]} anomalous" for c in short[:4])
        more = f" (and {len(short) - 4} more classes)" if len(short) > 4 else ""
        # The largest k every class can serve: both halves must fit in the smallest class.
        fits = min(min(2 * h[NORMAL] + 1, 2 * h[ANOMALOUS]) for h in have.values())
        advice = f"set {setting} to {fits} or less" if fits >= 1 else f"set {setting} = 0 (all images)"
        classes_setting = setting.rsplit(".", 1)[0] + ".classes" if "." in setting else "the class selection"
        raise DataError(
            f"{setting} = {k} takes {wanted[NORMAL]} normal and {wanted[ANOMALOUS]} anomalous images "
            f"per class, but {listing}{more}. {advice[0].upper() + advice[1:]}, add images to those "
            f"classes, or leave them out with {classes_setting}."
        )
    chosen: list[Sample] = []
    for class_name in classes:
        for label, count in wanted.items():
            group = groups.get((class_name, label), [])
            order = _permutation(seed, class_name, label, len(group))[:count]
            chosen += [group[j] for j in order]
    return sort_samples(chosen)


def train_val_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val), stratified by (class, label).

    Each group sends round(n * val_fraction) images to validation, at least one when the fraction
    is above 0 (so every class and label is held out, however small the k-shot set), and capped so
    that every group keeps one for training (a single image always stays in training).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"Validation fraction must be in [0, 1), got {val_fraction}.")
    train: list[Sample] = []
    val: list[Sample] = []
    for (class_name, label), group in _groups(samples).items():
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0:
            n_val = max(n_val, 1)
        n_val = min(n_val, len(group) - 1)
        order = _permutation(seed, class_name, label, len(group))
        val += [group[j] for j in order[:n_val]]
        train += [group[j] for j in order[n_val:]]
    return sort_samples(train), sort_samples(val)


def small_split_warning(val: Sequence[Sample], minimum: int) -> str | None:
    """A warning when a validation split has fewer than ``minimum`` images, saying how coarse its
    metrics are: per class, image AUROC over n normal and m anomalous images takes at most n*m+1
    values, so with one of each it can only be 0, 0.5 or 1."""
    if len(val) >= minimum:
        return None
    groups = _groups(val)
    classes = sorted({c for c, _ in groups})
    counts = {c: (len(groups.get((c, NORMAL), [])), len(groups.get((c, ANOMALOUS), []))) for c in classes}
    listing = ", ".join(f"{c} {n}+{a}" for c, (n, a) in list(counts.items())[:6])
    more = f", ... ({len(classes)} classes)" if len(classes) > 6 else ""
    steps = min((n * a for n, a in counts.values()), default=0)
    return (
        f"the validation split has only {len(val)} images (normal+anomalous per class: {listing}{more}), fewer "
        f"than {minimum}: a class's image AUROC can move only in steps of 1/{max(steps, 1)}, so its held-out "
        "metrics barely move and choosing a loop on them means little"
    )
