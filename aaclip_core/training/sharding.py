"""How the batches of a one-process loader are divided between the ranks of a job.

Training keeps the recipe's batch size *global*: every rank draws the same shuffled order (same
seeded generator) and takes its contiguous share of each global batch, the first
``batch % world`` ranks one sample more. A rank whose share is empty (a last batch smaller than
the number of ranks) computes one padding sample with weight 0, so that every rank still takes
part in each synchronised step while the padding counts for nothing in the loss. Evaluation hands
out whole one-process batches round-robin, so every image is scored in the very batch it would be
in a one-process run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, Dataset, Sampler


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of ``n`` samples."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class RankShareBatches(Sampler[list[tuple[int, float]]]):
    """This rank's (index, weight) share of each global batch; weight 0 marks padding."""

    def __init__(self, batches: BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        for batch in self.batches:
            start, stop = share_bounds(len(batch), self.rank, self.world)
            share = [(i, 1.0) for i in batch[start:stop]]
            yield share or [(batch[0], 0.0)]


class StridedBatches(Sampler[list[int]]):
    """Batches rank, rank + world, rank + 2*world, ... of a one-process batch order."""

    def __init__(self, batches: BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.world))

    def __iter__(self) -> Iterator[list[int]]:
        for b, batch in enumerate(self.batches):
            if b % self.world == self.rank:
                yield batch


class WeightedItems(Dataset):
    """A dataset read with (index, weight) keys: each item carries its weight in the batch loss."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float]) -> dict:
        index, weight = key
        return {**self.dataset[index], "weight": torch.tensor(weight, dtype=torch.float32)}

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def preload(self) -> None:
        self.dataset.preload()
