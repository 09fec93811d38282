"""The GPU loader, loader-worker side: read each sample's file, draw its box and flip; decode nothing
that nvJPEG can decode.

A JPEG that nvJPEG decodes as Pillow does (``jpeg.jpeg_info``) travels as its bytes, its size taken from
its header; any other file is decoded here by Pillow (``decode``) and travels as 8-bit levels [3, H, W].
Boxes and flips come from ``crop.crop_and_flip`` with the sample's stream position, as on the CPU loader.
A batch is a few flat uint8 buffers plus per-sample metadata (:class:`EncodedBatch`), so it crosses
processes and the bus as a handful of tensors. ``device_decode`` turns it into the training batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .crop import Box, crop_and_flip
from .decode import UnreadableImage, decode_rgb
from .jpeg import jpeg_info
from .normalize import to_levels
from .skips import Skipped, first_readable


class Encoded(NamedTuple):
    """One image as it travels: a JPEG's bytes (``jpeg``) or its decoded levels [3, H, W], flattened."""

    data: object  # bytes (a JPEG) or a uint8 tensor [3 * H * W]
    jpeg: bool
    height: int
    width: int


class EncodedSample(NamedTuple):
    image: Optional[Encoded]  # None when no image of the folder can be read
    index: int  # the image taken (the sample's own, or the one that replaced an unreadable file)
    position: int
    box: Box
    flip: bool
    skipped: Tuple[Skipped, ...] = ()
    error: str = ""


class EncodedBatch(NamedTuple):
    jpeg_bytes: torch.Tensor  # uint8 [B]: the JPEG files back to back
    jpeg_ends: torch.Tensor  # int64 [J]: where each JPEG ends in jpeg_bytes
    levels: torch.Tensor  # uint8 [T]: the other images' planes [3, H, W] back to back
    is_jpeg: torch.Tensor  # bool [N]
    shapes: torch.Tensor  # int64 [N, 2] (H, W)
    boxes: torch.Tensor  # int64 [N, 4] (left, top, right, bottom)
    flips: torch.Tensor  # bool [N]
    indices: torch.Tensor  # int64 [N]: the image each sample took
    positions: torch.Tensor  # int64 [N]: each sample's place in the data stream
    skipped: Tuple[Skipped, ...] = ()
    error: str = ""


def read_encoded(path) -> Encoded:
    """A file as it travels to the device (UnreadableImage when it is neither nvJPEG's nor readable by Pillow)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UnreadableImage(f"cannot read image {path}: {e.strerror or e}") from None
    info = jpeg_info(data)
    if info is not None and info.gpu:
        return Encoded(data, True, info.height, info.width)
    im = decode_rgb(data, name=str(path))
    return Encoded(to_levels(im).reshape(-1), False, im.height, im.width)


class EncodedFolder(torch.utils.data.Dataset):
    """The GPU loader's dataset: indexed by (image index, position in the data stream) as ``ImageFolder``;
    an unreadable file is replaced by the next readable one (``skips``)."""

    def __init__(self, paths: Sequence[Path], seed: int = 0):
        self.paths = list(paths)
        self.seed = seed
        self._bad: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Encoded:
        return read_encoded(self.paths[i])

    def sample(self, i: int, position: int) -> EncodedSample:
        """The sample at ``position`` of image i, or of the first readable image after it."""
        j, image, skipped, error = first_readable(i, self.paths, self.load, self._bad)
        if image is None:
            return EncodedSample(None, i, position, (0, 0, 0, 0), False, tuple(skipped), error)
        box, flip = crop_and_flip(self.seed, position, image.width, image.height)
        return EncodedSample(image, j, position, box, flip, tuple(skipped))

    def __getitem__(self, key) -> EncodedSample:
        i, position = key
        return self.sample(i, position)


def _flat(parts: Sequence[np.ndarray]) -> Tuple[torch.Tensor, list]:
    """uint8 arrays -> (one tensor of all of them, their end offsets)."""
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64).tolist()
    out = torch.empty((ends[-1] if ends else 0,), dtype=torch.uint8)
    flat = out.numpy()
    start = 0
    for p, end in zip(parts, ends):
        flat[start:end] = p
        start = end
    return out, ends


def collate_encoded(samples: Sequence[EncodedSample]) -> EncodedBatch:
    """Samples -> one batch: the JPEGs' bytes in one buffer, the decoded images' levels in another."""
    skipped = tuple(x for s in samples for x in s.skipped)
    error = next((s.error for s in samples if s.error), "")
    if error:
        empty = torch.empty((0,), dtype=torch.int64)
        return EncodedBatch(torch.empty((0,), dtype=torch.uint8), empty, torch.empty((0,), dtype=torch.uint8),
                            torch.empty((0,), dtype=torch.bool), empty.view(0, 2), empty.view(0, 4),
                            torch.empty((0,), dtype=torch.bool), empty, empty, skipped, error)
    jpegs = [np.frombuffer(s.image.data, dtype=np.uint8) for s in samples if s.image.jpeg]
    levels = [s.image.data.numpy() for s in samples if not s.image.jpeg]
    jpeg_bytes, jpeg_ends = _flat(jpegs)
    level_bytes, _ = _flat(levels)
    return EncodedBatch(
        jpeg_bytes, torch.tensor(jpeg_ends, dtype=torch.int64), level_bytes,
        torch.tensor([s.image.jpeg for s in samples], dtype=torch.bool),
        torch.tensor([(s.image.height, s.image.width) for s in samples], dtype=torch.int64).view(-1, 2),
        torch.tensor([s.box for s in samples], dtype=torch.int64).view(-1, 4),
        torch.tensor([s.flip for s in samples], dtype=torch.bool),
        torch.tensor([s.index for s in samples], dtype=torch.int64),
        torch.tensor([s.position for s in samples], dtype=torch.int64),
        skipped,
    )
