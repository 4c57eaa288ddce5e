"""A sampler that makes every epoch reproducible, on one process or many.

Each index it yields comes with a seed for that item's augmentation, derived from (run seed,
epoch, index). The epoch's order and augmentations therefore depend only on those three
numbers: not on the number of DataLoader workers, not on whether the run was resumed.
With several processes (torchrun), each rank takes every world_size-th item of the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)``; call ``set_epoch`` before each epoch."""

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        even: bool = True,
    ):
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.even = even  # pad (or drop) so ranks get equal shares; False for evaluation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if not self.even:
            return len(range(self.rank, self.length, self.world_size))
        if self.drop_last:
            return self.length // self.world_size
        return math.ceil(self.length / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        item_seeds = rng.integers(0, 2**31 - 1, size=self.length)
        if self.even:  # pad by wrapping (or drop) so every rank gets the same number of items
            order = np.resize(order, len(self) * self.world_size)
        mine = order[self.rank :: self.world_size]
        for index in mine.tolist():
            yield index, int(item_seeds[index])
