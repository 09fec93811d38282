"""The data stream: an endless sequence of shuffled epochs, each sample tagged with its position in it."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch


class StreamSampler(torch.utils.data.Sampler):
    """An endless sequence of shuffled epochs, from sample ``start`` on: yields (image index, position).
    Epoch e is the permutation seeded by (seed, e); position p is the p-th sample of the stream."""

    def __init__(self, num_images: int, seed: int = 0, start: int = 0):
        self.n, self.seed, self.start = num_images, seed, start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.start
        epoch, perm = None, None
        while True:
            e, offset = divmod(position, self.n)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            yield int(perm[offset]), position
            position += 1
