"""The data stream: an endless sequence of shuffled epochs, each sample tagged with its position in it."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch


class StreamSampler(torch.utils.data.Sampler):
    """An endless sequence of shuffled epochs, from sample ``start`` on: yields (image index, position).
    Epoch e is the permutation seeded by (seed, e); position p is the p-th sample of the stream.

    With ``world_size`` > 1 (one sampler per process), the stream is cut into consecutive global batches of
    ``batch_size`` samples from ``start`` on, and this sampler yields the ``rank``-th of ``world_size``
    equal consecutive parts of each: the processes' parts, put side by side, are the one-process stream."""

    def __init__(self, num_images: int, seed: int = 0, start: int = 0, *, batch_size: Optional[int] = None,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"batch_size {batch_size} does not split into {world_size} equal parts")
        self.n, self.seed, self.start = num_images, seed, start
        self.part = (batch_size // world_size) if world_size > 1 else None
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def positions(self) -> Iterator[int]:
        """The positions this sampler yields, in order."""
        if self.part is None:
            position = self.start
            while True:
                yield position
                position += 1
        first = self.start + self.rank * self.part
        while True:
            yield from range(first, first + self.part)
            first += self.batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, perm = None, None
        for position in self.positions():
            e, offset = divmod(position, self.n)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            yield int(perm[offset]), position
