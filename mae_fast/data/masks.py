"""What a training sample's mask is: its mask noise, keyed by its place in the data stream.

The loader draws each sample's noise, ``n = L / frames`` float32 values of ``torch.rand`` from a generator
seeded by (seed, the sample's position in the stream), and ships it with the batch; the model makes the
mask from it (``model.forward_train(imgs, mask_ratio, noise)``: the official semantics, the
``int(L (1 - mask_ratio))`` tokens of smallest noise are kept). A sample's mask therefore depends on
its position alone, as its crop and flip do (``crop``): not on the batch it is in, the process (rank)
that trains it, the loader workers or a restart. So one process and N processes train on the same masks.

torch's CPU generator keeps the low 32 bits of a seed. The mask generator of a sample is seeded 2**31
away from its crop generator (``crop.sample_generator``): a different seed from its own crop's, and from
the crop seed of any position less than 2**31 samples away (about 1 700 epochs of ImageNet-1k).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import torch

MASK_STREAM = 2**31  # the offset of the mask seeds from the crop seeds


def noise_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the mask noise of the sample at ``position`` of the stream of run ``seed``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position + MASK_STREAM) % (2**63))


def mask_noise(seed: int, position: int, n: int) -> torch.Tensor:
    """The mask noise of the sample at ``position``: float32 [n] in [0, 1)."""
    return torch.rand(n, generator=noise_generator(seed, position))


class WithNoise(torch.utils.data.Dataset):
    """A dataset indexed by (image index, position) whose items come with their mask noise: item -> (item,
    noise [n])."""

    def __init__(self, dataset, seed: int, n: int):
        self.dataset, self.seed, self.n = dataset, seed, n

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Tuple[Any, torch.Tensor]:
        return self.dataset[key], mask_noise(self.seed, key[1], self.n)


class CollateWithNoise:
    """The collate function of :class:`WithNoise` items: (collate(items), noise [N, n]). A class, not a
    closure, so that loader workers started by spawn can pickle it."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, samples: Sequence[Tuple[Any, torch.Tensor]]) -> Tuple[Any, torch.Tensor]:
        return self.collate([s for s, _ in samples]), torch.stack([noise for _, noise in samples])
