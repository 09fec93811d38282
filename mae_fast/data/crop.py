"""What a training sample gets: its RandomResizedCrop box and its flip, keyed by its place in the data stream.

Both loaders (CPU and GPU) draw a sample's box and flip here, from a generator seeded by (seed, the
sample's position in the stream), so they take the same crops, whatever the workers or a restart.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

Box = Tuple[int, int, int, int]  # (left, top, right, bottom): pixel edges, as Pillow's ``box``


def random_resized_crop_box(width: int, height: int, gen: torch.Generator, scale=(0.2, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> Box:
    """(left, top, right, bottom) of a random crop with area ``scale`` of the image and aspect ``ratio``
    (log-uniform), as RandomResizedCrop draws it: ten tries, then the largest centred crop of an allowed
    aspect."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int) -> Box:
    """The largest centred square."""
    s = min(width, height)
    left, top = (width - s) // 2, (height - s) // 2
    return left, top, left + s, top + s


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at ``position`` of the stream of run ``seed``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63))


def crop_and_flip(seed: int, position: int, width: int, height: int) -> Tuple[Box, bool]:
    """The box and the flip of the sample at ``position`` when its image is width x height."""
    gen = sample_generator(seed, position)
    box = random_resized_crop_box(width, height, gen)
    return box, float(torch.rand(1, generator=gen)) < 0.5
