"""One comparison entry: a row against the reference on one test dataset, with its fairness, the
metric deltas and the paired-bootstrap intervals on image and pixel AUROC."""

from __future__ import annotations

from typing import Any, Callable

from aaclip_core.compare.fairness import fairness
from aaclip_core.compare.rows import Row
from aaclip_core.evaluation import bootstrap as bs
from aaclip_core.evaluation.protocol import METRIC_NAMES


def _statement(res, row: Row, ref: Row, dataset: str, entry: dict) -> str:
    statement = bs.describe(res, row.label, ref.label, dataset)
    if not entry["fair"]:
        statement += " [UNFAIR: " + "; ".join(entry["unfair"]) + "]"
    return statement


def compare_pair(
    row: Row,
    ref: Row,
    dataset: str,
    image_sets: dict[tuple[str, str], set[str] | None],
    image_scores: Callable[[str], list[bs.ImageScore] | None],
    pixel_pairs: Callable[[str], dict | None],
    resamples: int,
) -> dict[str, Any]:
    """``image_scores`` / ``pixel_pairs`` give a test run's stored per-image scores / pixel pairs
    (None when it has none)."""
    entry: dict[str, Any] = {"row": row.key, "reference": ref.key, "dataset": dataset}
    entry.update(fairness(row, ref, dataset, (image_sets.get((row.key, dataset)), image_sets.get((ref.key, dataset)))))
    entry.update(delta={}, bootstrap=None, statement=None)
    entry["pixel_ci"] = {"available": False, "reason": bs.PIXEL_CI_UNAVAILABLE}
    if dataset not in ref.tests:
        return entry
    mine, theirs = row.tests[dataset], ref.tests[dataset]
    entry["delta"] = {m: mine.metrics[m] - theirs.metrics[m] for m in METRIC_NAMES
                      if m in mine.metrics and m in theirs.metrics}
    if resamples <= 0:
        return entry
    sa, sb = image_scores(mine.run_id), image_scores(theirs.run_id)
    if sa is not None and sb is not None:
        res = bs.paired_image_auroc(sa, sb, resamples)
        if res is not None:
            entry["bootstrap"] = res.as_dict()
            entry["verdict_bootstrap"] = bs.verdict(res)
            entry["statement"] = _statement(res, row, ref, dataset, entry)
    else:
        entry["bootstrap_missing"] = "a test run has no results/image_scores.csv"
    pa, pb = pixel_pairs(mine.run_id), pixel_pairs(theirs.run_id)
    res = bs.paired_pixel_auroc(pa, pb, resamples) if pa is not None and pb is not None else None
    if res is not None:
        entry["pixel_ci"] = {"available": True, "bootstrap": res.as_dict(), "verdict": bs.verdict(res),
                             "statement": _statement(res, row, ref, dataset, entry)}
    return entry
