"""The CPU loader: Pillow decodes, crops, resizes (bicubic) and flips each sample in a loader worker.

A sample comes out as 8-bit levels [3, S, S]; the batch is normalised where it is used
(:func:`mae_fast.data.normalize`, on the training device), so uint8 crosses to a GPU. This is the oracle
of the GPU loader (``gpu_folder`` + ``device_decode``): the same files, boxes and flips.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from PIL import Image

from .crop import center_box, crop_and_flip
from .decode import UnreadableImage, load_rgb
from .normalize import normalize, to_levels
from .skips import Skipped, first_readable

CACHE_MAX_IMAGES = 256  # folders up to this size are decoded once and kept in memory (per process)


class Sample(NamedTuple):
    levels: Optional[torch.Tensor]  # uint8 [3, S, S]; None when no image of the folder can be read
    skipped: Tuple[Skipped, ...] = ()  # unreadable files passed over for this sample
    error: str = ""  # why there is no sample


class LevelBatch(NamedTuple):
    levels: torch.Tensor  # uint8 [N, 3, S, S]
    skipped: Tuple[Skipped, ...] = ()
    error: str = ""


def collate_levels(samples: Sequence[Sample]) -> LevelBatch:
    """Samples -> one batch (in a loader worker the stacked levels go to shared memory directly)."""
    skipped = tuple(x for s in samples for x in s.skipped)
    error = next((s.error for s in samples if s.error), "")
    if error:
        return LevelBatch(torch.empty((0, 3, 0, 0), dtype=torch.uint8), skipped, error)
    return LevelBatch(torch.utils.data.default_collate([s.levels for s in samples]), skipped)


class ImageFolder(torch.utils.data.Dataset):
    """Training samples of the official augmentation. Indexed by (image index, position in the data stream):
    the position seeds the sample's crop and flip, so the data do not depend on workers or restarts. An
    unreadable image is replaced by the next readable one (``skips``)."""

    def __init__(self, paths: Sequence[Path], size: int, seed: int = 0, cache: Optional[bool] = None):
        self.paths = list(paths)
        self.size = size
        self.seed = seed
        self.cache = len(self.paths) <= CACHE_MAX_IMAGES if cache is None else cache
        self._decoded: Dict[int, Image.Image] = {}
        self._bad: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        """Image i as 8-bit RGB (UnreadableImage when it cannot be read)."""
        if not self.cache:
            return load_rgb(self.paths[i])
        if i not in self._decoded:
            self._decoded[i] = load_rgb(self.paths[i])
        return self._decoded[i]

    def __getitem__(self, key) -> Sample:
        i, position = key
        _, im, skipped, error = first_readable(i, self.paths, self.image, self._bad)
        if im is None:
            return Sample(None, tuple(skipped), error)
        box, flip = crop_and_flip(self.seed, position, im.width, im.height)
        im = im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return Sample(to_levels(im), tuple(skipped))

    def fixed(self, n: int) -> torch.Tensor:
        """The first ``n`` readable images, centre-cropped (no augmentation), normalised: [n, 3, size, size]."""
        out, first_error = [], ""
        for i in range(len(self)):
            if len(out) == n:
                break
            try:
                im = self.image(i)
            except UnreadableImage as e:
                first_error = first_error or str(e)
                continue
            box = center_box(im.width, im.height)
            out.append(to_levels(im.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)))
        if not out:
            raise UnreadableImage(f"none of the {len(self)} images can be read ({first_error})")
        return normalize(torch.stack(out))
