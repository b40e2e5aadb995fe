"""The samplers of the LRA datamodules: a resumable, rank-sharded training shuffle and an
evaluation split over ranks that counts every row once."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """A shuffle that is a pure function of (seed, epoch), sharded over ranks, able to resume.

    Each epoch one permutation of the n rows is padded (repeating its start, as
    DistributedSampler does) to a multiple of the world size, and rank r takes positions r, r +
    world, r + 2·world, ... Lightning calls ``set_epoch`` each epoch, and leaves a
    DistributedSampler in place instead of wrapping it in its own.

    A run resumed mid-epoch passes ``resume=(epoch, samples_done)``, samples_done counting all
    ranks: that epoch's permutation is recomputed and each rank skips its first samples_done /
    world samples, which are exactly the first samples_done of the permutation (with another world
    size than before too, up to rounding). ``len()`` stays the full shard length in that epoch, since Lightning
    counts the batches done before the interruption towards the same epoch.
    """

    def __init__(self, n: int, seed: int, resume: tuple[int, int] = (0, 0), num_replicas: int = 1, rank: int = 0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n
        self.epoch, self.resume = resume[0], resume

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = (order * math.ceil(self.total_size / max(self.n, 1)))[: self.total_size]
        shard = order[self.rank : self.total_size : self.num_replicas]
        if self.resume[0] == self.epoch and self.resume[1]:
            shard, self.resume = shard[self.resume[1] // self.num_replicas :], (0, 0)
        return iter(shard)


class ShardSampler(DistributedSampler):
    """Evaluation rows split over ranks without padding: rank r takes rows r, r + world, r +
    2·world, ..., so every row is counted exactly once. Lightning's own DistributedSampler would
    repeat rows to even out the shards, counting a few of them twice in val/test accuracy; being
    a DistributedSampler, this one is left in place. Shards differ by at most one row, which is
    harmless in evaluation: no collective runs per batch, and the accuracy's counts are summed
    over ranks once at the end."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.rows = range(rank, n, num_replicas)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows)
