"""Prediction work spread over the processes torchrun starts (``torchrun ... -m medseg predict``).

Each process (rank) takes its share of the files (`Shards.share`), rank 0 does alone what must
happen once (claiming the output folder, writing the summary; `Shards.main_first`), and the
ranks' results meet on rank 0 (`Shards.gather`). Without torchrun there is one share holding
everything and every step runs in place.

The ranks exchange file lists and results only, never tensors of a network, so they talk
through gloo whatever device predicts: a GPU machine needs no NCCL group for this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medseg.core.errors import MedsegError
from medseg.engine.runtime import Ranks, init_distributed

T = TypeVar("T")


@dataclass(frozen=True)
class Shards:
    """This process's place in a job spread over ranks (one process: rank 0 of 1)."""

    ranks: Ranks

    @classmethod
    def join(cls) -> Shards:
        """The ranks torchrun describes (RANK, WORLD_SIZE), joined in a gloo group; one process
        without them. The caller releases the group (`releases_process_group`)."""
        return cls(init_distributed(torch.device("cpu")))  # cpu: gloo, whatever predicts

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of ``items``. The slices differ in length by one at most,
        and those of ranks 0, 1, ... joined are ``items`` in their order."""
        count, world, rank = len(items), self.ranks.world_size, self.ranks.rank
        return list(items[rank * count // world : (rank + 1) * count // world])

    def main_first(self, function: Callable[[], T]) -> T:
        """Run ``function`` on rank 0 alone while the others wait, and give every rank its result.

        When it raises, rank 0 raises that error and every other rank a MedsegError with its
        message, so no rank waits for a result that will not come.
        """
        if not self.ranks.distributed:
            return function()
        if not self.is_main:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            failed, value = message[0]
            if failed:
                raise MedsegError(value)
            return value
        try:
            value = function()
        except BaseException as error:
            dist.broadcast_object_list([(True, str(error) or type(error).__name__)], src=0)
            raise
        dist.broadcast_object_list([(False, value)], src=0)
        return value

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` (picklable) on rank 0, in rank order; None on the others."""
        if not self.ranks.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.ranks.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
