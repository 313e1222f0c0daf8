"""Time aaclip_core.evaluation.metrics against sklearn on evaluation-sized inputs.

Usage: python benchmarks/bench_metrics.py [--pixels N] [--positive-rate R] [--maps N]
                                         [--size S] [--skip-sklearn]

Prints wall-clock and CPU seconds for, in this order: our AUROC + AP (separate calls and
one shared call), our AUPRO on a stack of anomaly maps (exact and with 200 thresholds),
and sklearn's roc_auc_score + average_precision_score on the same pixels (with the
largest difference from ours), plus the process's peak resident memory after each stage.
Each peak-RSS figure covers everything before it, hence sklearn runs last.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Running `python benchmarks/bench_metrics.py` from a checkout puts benchmarks/ (not the
# repository root) on sys.path; make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aaclip_core.evaluation.metrics import (  # noqa: E402
    aupro,
    auroc,
    average_precision,
    detection_metrics,
)


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(function: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
    """Run ``function``; return its result and (wall, CPU) seconds.

    CPU seconds are reported too because wall time on a shared machine depends on
    what else runs there.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def _report(stage: str, seconds: tuple[float, float], detail: str = "") -> None:
    wall, cpu = seconds
    print(
        f"{stage:<44} {wall:7.2f} s wall {cpu:7.2f} s CPU   "
        f"peak RSS {_peak_rss_mib():6.0f} MiB   {detail}"
    )


def _pixel_data(
    num_pixels: int, positive_rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scores like a model's anomaly maps: continuous, mildly informative."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(num_pixels, generator=generator) < positive_rate
    scores = torch.rand(num_pixels, generator=generator)
    scores += 0.5 * labels
    return scores, labels


def _map_data(num_maps: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps with zero to two elliptic defects per image, float32 like a model's."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    masks = np.zeros((num_maps, size, size), dtype=bool)
    for index in range(num_maps):
        for _ in range(rng.integers(0, 3)):
            centre = rng.uniform(0.1, 0.9, size=2) * size
            radii = rng.uniform(0.01, 0.15, size=2) * size
            masks[index] |= ((rows - centre[0]) / radii[0]) ** 2 + (
                (cols - centre[1]) / radii[1]
            ) ** 2 <= 1.0
    maps = rng.random(masks.shape, dtype=np.float32) + 0.6 * masks
    return torch.from_numpy(maps), torch.from_numpy(masks)


def _bench_ours(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Time the separate metric calls (two sorts) and the shared one (one sort)."""
    def separately() -> tuple[float, float]:
        return auroc(scores, labels), average_precision(scores, labels)

    _, seconds = _timed(separately)
    _report("ours: auroc() + average_precision()", seconds)
    shared, seconds = _timed(lambda: detection_metrics(scores, labels))
    _report("ours: detection_metrics() (one sort, +f1)", seconds)
    print(f"  auroc {shared['auroc']:.12f}  ap {shared['ap']:.12f}  f1_max {shared['f1_max']:.6f}")
    return shared


def _bench_sklearn(scores: torch.Tensor, labels: torch.Tensor, ours: dict[str, float]) -> None:
    """Time sklearn on the same pixels and report how far our results are from it."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_true, y_score = labels.numpy(), scores.numpy()

    def sklearn_metrics() -> tuple[float, float]:
        return roc_auc_score(y_true, y_score), average_precision_score(y_true, y_score)

    (sk_auroc, sk_ap), seconds = _timed(sklearn_metrics)
    difference = max(abs(ours["auroc"] - sk_auroc), abs(ours["ap"] - sk_ap))
    _report("sklearn: roc_auc_score + average_precision", seconds, f"max |diff| {difference:.1e}")


def _bench_aupro(num_maps: int, size: int) -> None:
    """Time exact and 200-threshold AUPRO on a synthetic stack of maps."""
    maps, masks = _map_data(num_maps, size, seed=1)
    print(f"{num_maps} maps of {size}x{size} ({maps.numel():,} pixels, "
          f"{int(masks.sum()):,} anomalous)")
    exact, seconds = _timed(lambda: aupro(maps, masks))
    _report("ours: aupro (exact)", seconds, f"{exact:.9f}")
    approximate, seconds = _timed(lambda: aupro(maps, masks, num_thresholds=200))
    _report("ours: aupro (num_thresholds=200)", seconds, f"{approximate:.9f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=40_000_000)
    parser.add_argument("--positive-rate", type=float, default=0.03)
    parser.add_argument("--maps", type=int, default=100)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    scores, labels = _pixel_data(args.pixels, args.positive_rate, seed=0)
    print(f"{args.pixels:,} pixels, {int(labels.sum()):,} anomalous, float32 scores")
    _report("data generated", (0.0, 0.0))
    ours = _bench_ours(scores, labels)
    # AUPRO runs before sklearn so that its peak-RSS figure excludes sklearn's.
    _bench_aupro(args.maps, args.size)
    if not args.skip_sklearn:
        _bench_sklearn(scores, labels, ours)


if __name__ == "__main__":
    main()
