"""The batching loop of `predict`, the same for a model and for an exported file: images are read
in order, scored ``batch_size`` at a time, and every job ends as one row in its place, an error row
when it cannot be read or classed. Each image is scored independently, so rows do not depend on the
batch size. No model here (and no torch): the caller brings how to read and how to score."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from aaclip_score.errors import DataError
from aaclip_score.inputs import ImageJob
from aaclip_score.outputs import ImageOutputs, make_out_dir

Item = TypeVar("Item")


def score_in_batches(
    jobs: list[ImageJob],
    batch_size: int,
    read: Callable[[ImageJob], Item],
    score: Callable[[list[tuple[ImageJob, Item]]], list[dict]],
    outputs: ImageOutputs,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """One row per job, in order. ``read`` loads one image (a `DataError` makes an error row);
    ``score`` turns a batch of read images into their rows; ``progress(done, total)`` after each batch."""
    rows: list[dict | None] = [None] * len(jobs)
    make_out_dir(outputs.out_dir)
    n_batches = max(1, math.ceil(sum(j.error is None for j in jobs) / batch_size))
    batch: list[tuple[int, ImageJob, Item]] = []
    done = 0

    def flush() -> None:
        for (pos, _, _), r in zip(batch, score([(job, item) for _, job, item in batch]), strict=True):
            rows[pos] = r

    for pos, job in enumerate(jobs):
        if job.error is None:
            try:
                batch.append((pos, job, read(job)))
            except DataError as exc:
                job.error = str(exc)
        if job.error is not None:
            rows[pos] = outputs.failed(job)
        if len(batch) == batch_size:
            flush()
            batch, done = [], done + 1
            if progress is not None:
                progress(done, n_batches)
    if batch:
        flush()
        if progress is not None:
            progress(n_batches, n_batches)
    return [r for r in rows if r is not None]
