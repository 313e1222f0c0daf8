"""Paired bootstrap of the difference in mean image AUROC between two test runs (`compare`).

Both runs scored the same test images (paired by image path, from ``results/image_scores.csv``).
One bootstrap replicate resamples, within every class, the anomalous and the normal images
with replacement (stratified by label, so every replicate keeps both labels and the per-class
AUROC stays defined), applies the *same* resample to both runs, and recomputes per-class
image AUROC and its mean over classes for each run; the difference of the two means is one
replicate. The 95 % interval is the 2.5 / 97.5 percentile of the replicates.

The image scores are taken as the test run computed them (min-max normalised over the whole
test class): the scorer is held fixed and only the choice of test images varies.

Each replicate's AUROC is computed exactly, without re-sorting: for a class with P anomalous
and N normal images, ``M[i, j] = 1`` when anomalous image ``i`` outscores normal image ``j``
(½ on a tie), and a resample drawing anomalous image ``i`` ``a_i`` times and normal image
``j`` ``b_j`` times has AUROC ``a @ M @ b / (P * N)`` — the Mann-Whitney statistic of the
resampled scores, i.e. what :func:`aaclip_core.evaluation.metrics.auroc` returns on them (tested).

Pixel AUROC is bootstrapped the same way from the exact per-class pixel pair counts that
`aaclip test` stores (``results/pixel_pairs.npz``, see :mod:`aaclip_core.evaluation.pixel_pairs`): a resample
weights each image by how often it was drawn. Test runs made before that artifact existed have
no pixel interval; `compare` says so.

A sweep's best trial against its runner-up (`doctor`, :func:`lead`) is bootstrapped the same way over
the validation images both trials were scored on (``validation/<checkpoint>/`` of each trial run).
When the two were scored on different images (a swept setting moved the split) the draws cannot be
shared: each trial's own images are resampled independently (unpaired) and the interval says so.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aaclip_core.evaluation import metrics
from aaclip_core.evaluation.pixel_pairs import PixelPairs
from aaclip_core.names import IMAGE_AUROC, METRIC_LABELS, PIXEL_AUROC

DEFAULT_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ImageScore:
    path: str
    class_name: str
    label: int
    score: float


def read_image_scores(path: Path) -> list[ImageScore]:
    """Rows of a test run's ``results/image_scores.csv``."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [
            ImageScore(r["path"], r["class_name"], int(r["label"]), float(r["image_score"]))
            for r in csv.DictReader(fh)
        ]


@dataclass
class BootstrapResult:
    metric: str
    resamples: int
    seed: int
    confidence: float
    diff: float  # point estimate on all paired images: mean-over-classes AUROC, row minus reference
    ci_low: float
    ci_high: float
    p_not_better: float  # share of replicates with difference <= 0
    n_images: int  # paired images used
    n_classes: int  # classes with both labels (where AUROC is defined)
    unpaired_images: int = 0  # images only one of the two runs scored (left out)
    label_mismatches: int = 0  # paired paths whose labels disagree (left out)
    skipped_classes: list[str] = field(default_factory=list)  # one label only
    paired: bool = True  # one resample of the shared images for both; False: each its own images

    def as_dict(self) -> dict:
        return asdict(self)


def pair_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``M[i, j]`` = 1 if ``pos[i] > neg[j]``, ½ if equal, else 0 (float64)."""
    pos = np.asarray(pos, dtype=np.float64)[:, None]
    neg = np.asarray(neg, dtype=np.float64)[None, :]
    return (pos > neg) + 0.5 * (pos == neg)


def resampled_auroc(m: np.ndarray, pos_counts: np.ndarray, neg_counts: np.ndarray) -> np.ndarray:
    """AUROC of each resample (rows of the count matrices) from the pair matrix ``m``."""
    p, n = m.shape
    return ((pos_counts @ m) * neg_counts).sum(axis=1) / (p * n)


def _counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def paired_image_auroc(
    row: list[ImageScore],
    ref: list[ImageScore],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> BootstrapResult | None:
    """CI of (mean image AUROC of ``row``) - (that of ``ref``) over the images both scored.

    Returns None when no class has both anomalous and normal paired images.
    """
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    by_path_ref = {s.path: s for s in ref}
    by_path_row = {s.path: s for s in row}
    common = sorted(set(by_path_ref) & set(by_path_row))
    unpaired = len(set(by_path_ref) ^ set(by_path_row))
    mismatched = [p for p in common if by_path_ref[p].label != by_path_row[p].label]
    bad = set(mismatched)
    classes: dict[str, list[str]] = {}
    for p in common:
        if p not in bad:
            classes.setdefault(by_path_ref[p].class_name, []).append(p)

    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    point = 0.0
    used, images, skipped = 0, 0, []
    for cname in sorted(classes):
        paths = classes[cname]
        pos = [p for p in paths if by_path_ref[p].label == 1]
        neg = [p for p in paths if by_path_ref[p].label == 0]
        if not pos or not neg:
            skipped.append(cname)
            continue
        pos_counts = _counts(rng, len(pos), resamples)
        neg_counts = _counts(rng, len(neg), resamples)
        diff_b = np.zeros(resamples)
        diff = 0.0
        for sign, table in ((1.0, by_path_row), (-1.0, by_path_ref)):
            s_pos = np.array([table[p].score for p in pos])
            s_neg = np.array([table[p].score for p in neg])
            diff_b += sign * resampled_auroc(pair_matrix(s_pos, s_neg), pos_counts, neg_counts)
            labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            diff += sign * metrics.auroc(np.r_[s_pos, s_neg], labels)
        total += diff_b
        point += diff
        used += 1
        images += len(paths)
    return _result(IMAGE_AUROC, total, point, used, resamples, seed, confidence, n_images=images,
                   unpaired_images=unpaired, label_mismatches=len(mismatched), skipped_classes=skipped)


def _result(metric: str, total: np.ndarray, point: float, used: int, resamples: int, seed: int,
            confidence: float, **counts) -> BootstrapResult | None:
    """Mean over classes of the summed per-class replicate differences -> percentile interval."""
    if used == 0:
        return None
    return _interval(metric, total / used, point / used, resamples, seed, confidence, n_classes=used, **counts)


def _interval(metric: str, reps: np.ndarray, diff: float, resamples: int, seed: int, confidence: float,
              **counts) -> BootstrapResult:
    """The percentile interval of the replicate differences ``reps`` around the point difference ``diff``."""
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return BootstrapResult(metric=metric, resamples=resamples, seed=seed, confidence=confidence, diff=diff,
                           ci_low=float(lo), ci_high=float(hi), p_not_better=float(np.mean(reps <= 0)), **counts)


def verdict(result: BootstrapResult) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'no significant difference'."""
    if result.ci_low > 0:
        return "better"
    if result.ci_high < 0:
        return "worse"
    return "no significant difference"


def describe(result: BootstrapResult, row_label: str, ref_label: str, dataset: str) -> str:
    """One sentence: the claim, the point difference and its interval (x100 points)."""
    v = verdict(result)
    claim = {
        "better": f"{row_label} beats {ref_label}",
        "worse": f"{row_label} is worse than {ref_label}",
    }.get(v, f"{row_label} does not differ significantly from {ref_label}")
    pct = int(round(100 * result.confidence))
    metric = METRIC_LABELS.get(result.metric, result.metric)
    return (
        f"{claim} on {dataset}: {metric} {100 * result.diff:+.2f} points "
        f"({pct}% CI {100 * result.ci_low:+.2f} to {100 * result.ci_high:+.2f}; paired bootstrap, "
        f"{result.resamples} resamples of {result.n_images} images in {result.n_classes} classes)"
    )


PIXEL_CI_UNAVAILABLE = (
    "pixel AUROC CI not available: a test run has no results/pixel_pairs.npz (tested before aaclip "
    "stored it, or with eval.pixel_pairs = false); re-run `aaclip test` to get it"
)


def paired_pixel_auroc(
    row: dict[str, tuple[list[str], PixelPairs]],
    ref: dict[str, tuple[list[str], PixelPairs]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> BootstrapResult | None:
    """CI of (mean pixel AUROC of ``row``) - (that of ``ref``) over the images both scored,
    resampling anomalous and normal images within each class, the same draw for both runs."""
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    point, used, images, skipped, unpaired = 0.0, 0, 0, [], 0
    for cname in sorted(set(row) & set(ref)):
        paths_a, pa = row[cname]
        paths_b, pb = ref[cname]
        common = sorted(set(paths_a) & set(paths_b))
        unpaired += len(set(paths_a) ^ set(paths_b))
        ia = np.array([paths_a.index(p) for p in common], dtype=int)
        ib = np.array([paths_b.index(p) for p in common], dtype=int)
        order, k = _anomalous_first(pa.pos[ia] > 0)
        if k == 0 or k == len(order):
            skipped.append(cname)
            continue
        ia, ib = ia[order], ib[order]
        weights = np.c_[_counts(rng, k, resamples), _counts(rng, len(order) - k, resamples)]
        diff_b = np.zeros(resamples)
        for sign, pp, idx in ((1.0, pa, ia), (-1.0, pb, ib)):
            sub = _subset(pp, idx)
            diff_b += sign * _resampled_pixel_auroc(sub, weights)
            point += sign * sub.auroc()
        total += diff_b
        used += 1
        images += len(order)
    return _result(PIXEL_AUROC, total, point, used, resamples, seed, confidence, n_images=images,
                   unpaired_images=unpaired, skipped_classes=skipped)


def _anomalous_first(anomalous: np.ndarray) -> tuple[np.ndarray, int]:
    """The image order with the anomalous images first (a resample's weights are drawn per label in
    that order), and how many are anomalous."""
    return np.r_[np.flatnonzero(anomalous), np.flatnonzero(~anomalous)], int(anomalous.sum())


def _subset(pp: PixelPairs, idx: np.ndarray) -> PixelPairs:
    """The pixel pairs of the images ``idx``, in that order."""
    return PixelPairs(pp.counts[np.ix_(idx, idx)], pp.pos[idx], pp.neg[idx])


def _resampled_pixel_auroc(pp: PixelPairs, weights: np.ndarray) -> np.ndarray:
    """Pixel AUROC of each resample (rows of ``weights``: how often each image was drawn)."""
    return np.einsum("bi,ij,bj->b", weights, pp.counts, weights) / ((weights @ pp.pos) * (weights @ pp.neg))


# ---------------------------------------------------------------------------- a sweep's lead

# The metrics a bootstrap recomputes exactly from what a run stores (image scores, pixel pairs).
BOOTSTRAPPED = (IMAGE_AUROC, PIXEL_AUROC)


@dataclass
class ScoredImages:
    """One model's scores of a set of labelled images: per image, and per class the pixel pairs (None
    when they were not stored). What a bootstrap over those images needs."""

    images: list[ImageScore]
    pixels: dict[str, tuple[list[str], PixelPairs]] | None = None


def lead(best: ScoredImages, other: ScoredImages, metric: str, resamples: int = DEFAULT_RESAMPLES,
         seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> BootstrapResult | None:
    """CI of (``metric`` of ``best``) - (that of ``other``): paired by image when both scored the same
    labelled images, else unpaired. None when no class has both labels (or, for pixel AUROC, either
    has no pixel pairs)."""
    if metric not in BOOTSTRAPPED:
        raise ValueError(f"no bootstrap for {metric}: only {', '.join(BOOTSTRAPPED)}")
    if metric == PIXEL_AUROC and (best.pixels is None or other.pixels is None):
        return None
    if _labelled(best) == _labelled(other):
        if metric == IMAGE_AUROC:
            return paired_image_auroc(best.images, other.images, resamples, seed, confidence)
        return paired_pixel_auroc(best.pixels, other.pixels, resamples, seed, confidence)
    return _unpaired(best, other, metric, resamples, seed, confidence)


def _labelled(scored: ScoredImages) -> set[tuple[str, str, int]]:
    return {(s.path, s.class_name, s.label) for s in scored.images}


def _unpaired(a: ScoredImages, b: ScoredImages, metric: str, resamples: int, seed: int,
              confidence: float) -> BootstrapResult | None:
    rng = np.random.default_rng(seed)
    own_a, own_b = _own_replicates(a, metric, rng, resamples), _own_replicates(b, metric, rng, resamples)
    if own_a is None or own_b is None:
        return None
    (reps_a, point_a, images_a, classes_a), (reps_b, point_b, _, _) = own_a, own_b
    return _interval(metric, reps_a - reps_b, point_a - point_b, resamples, seed, confidence, n_images=images_a,
                     n_classes=classes_a, unpaired_images=len(_labelled(a) ^ _labelled(b)), paired=False)


def _own_replicates(scored: ScoredImages, metric: str, rng: np.random.Generator,
                    resamples: int) -> tuple[np.ndarray, float, int, int] | None:
    """One model's ``metric`` (mean over classes) on ``resamples`` resamples of its own images,
    stratified by class and label; its value on all of them; the images and classes used."""
    total, point, used, images = np.zeros(resamples), 0.0, 0, 0
    for pos, neg, reps_of, value in _classes(scored, metric):
        if not len(pos) or not len(neg):
            continue
        weights = (_counts(rng, len(pos), resamples), _counts(rng, len(neg), resamples))
        total += reps_of(*weights)
        point += value
        used += 1
        images += len(pos) + len(neg)
    return (total / used, point / used, images, used) if used else None


def _classes(scored: ScoredImages, metric: str):
    """Per class: its anomalous and normal images, the metric of a resample (drawn counts of each)
    and the metric on all of them."""
    if metric == IMAGE_AUROC:
        by_class: dict[str, list[ImageScore]] = {}
        for s in scored.images:
            by_class.setdefault(s.class_name, []).append(s)
        for rows in by_class.values():
            pos = np.array([s.score for s in rows if s.label == 1])
            neg = np.array([s.score for s in rows if s.label == 0])
            m = pair_matrix(pos, neg)
            value = metrics.auroc(np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))]) \
                if len(pos) and len(neg) else float("nan")
            yield pos, neg, (lambda pc, nc, m=m: resampled_auroc(m, pc, nc)), value
        return
    for _, pp in (scored.pixels or {}).values():
        order, k = _anomalous_first(pp.pos > 0)
        sub = _subset(pp, order)
        yield order[:k], order[k:], (lambda pc, nc, sub=sub: _resampled_pixel_auroc(sub, np.c_[pc, nc])), sub.auroc()
