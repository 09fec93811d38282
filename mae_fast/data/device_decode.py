"""The GPU loader, training-process side: an :class:`~mae_fast.data.gpu_folder.EncodedBatch` -> the
training batch [N, 3, S, S] on the device.

The JPEGs are decoded on the device in one batched call of ``torchvision.io.decode_jpeg`` (nvJPEG; the
hardware JPEG decoder where the GPU has one), the images a worker decoded are uploaded as uint8, and one
``mae_fast.ops.resized_crop`` launch crops, resizes, flips and normalises them all. A JPEG nvJPEG refuses
is decoded here by Pillow, and a file Pillow cannot read either is replaced as on the CPU loader
(``skips``). On a CPU device Pillow stands in for nvJPEG: the path's CPU twin, which the tests compare
with the CPU loader.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .crop import crop_and_flip
from .decode import UnreadableImage, decode_rgb, load_rgb
from .gpu_folder import EncodedBatch, EncodedFolder
from .normalize import IMAGENET_MEAN, IMAGENET_STD, to_levels
from .skips import Skipped, first_readable

JpegDecoder = Callable[[List[torch.Tensor]], List[torch.Tensor]]


def nvjpeg_decoder(device: torch.device) -> JpegDecoder:
    """JPEG bytes (CPU uint8 tensors) -> uint8 [3, H, W] on ``device``, with torchvision's batched nvJPEG
    decode. torchvision is imported here, only for this path."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise ImportError(f"the GPU loader decodes JPEGs with torchvision.io.decode_jpeg (nvJPEG), and torchvision "
                          f"does not import here ({e}); install torchvision, or use the CPU loader "
                          "(--loader cpu)") from None

    def decode(datas: List[torch.Tensor]) -> List[torch.Tensor]:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    return decode


def pillow_decoder(datas: List[torch.Tensor]) -> List[torch.Tensor]:
    """The CPU twin of :func:`nvjpeg_decoder`: Pillow decodes (UnreadableImage on failure)."""
    return [to_levels(decode_rgb(d.numpy().tobytes(), name="JPEG bytes")) for d in datas]


class DeviceDecoder:
    """Turns a batch of the GPU loader into training samples on ``device``: [N, 3, size, size] in ``dtype``."""

    def __init__(self, folder: EncodedFolder, size: int, device, dtype: torch.dtype = torch.float32,
                 decode_jpegs: Optional[JpegDecoder] = None):
        self.folder, self.size, self.dtype = folder, size, dtype
        self.device = torch.device(device)
        if decode_jpegs is None:
            decode_jpegs = nvjpeg_decoder(self.device) if self.device.type == "cuda" else pillow_decoder
        self.decode_jpegs = decode_jpegs
        self._bad: Dict[int, str] = {}  # files this process found unreadable

    def _decode(self, datas: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Decode all in one call; if that fails, one by one (None for each that fails)."""
        if not datas:
            return []
        try:
            return list(self.decode_jpegs(datas))
        except (RuntimeError, ValueError):
            out: List[Optional[torch.Tensor]] = []
            for d in datas:
                try:
                    out.append(self.decode_jpegs([d])[0])
                except (RuntimeError, ValueError):
                    out.append(None)
            return out

    def _fallback(self, index: int, position: int) -> Tuple[torch.Tensor, Tuple[int, int, int, int], bool,
                                                             List[Skipped]]:
        """Image ``index`` read by Pillow here, or the next readable one: (levels on the device, box, flip,
        the files skipped)."""
        j, im, skipped, error = first_readable(index, self.folder.paths, lambda k: load_rgb(self.folder.paths[k]),
                                               self._bad)
        if im is None:
            raise UnreadableImage(error)
        box, flip = crop_and_flip(self.folder.seed, position, im.width, im.height)
        return to_levels(im).to(self.device), box, flip, skipped

    def __call__(self, batch: EncodedBatch) -> Tuple[torch.Tensor, List[Skipped]]:
        """(the training batch, files skipped here)."""
        from ..ops.resized_crop import resized_crop

        N = batch.flips.numel()
        shapes, boxes, flips = batch.shapes.tolist(), batch.boxes.tolist(), batch.flips.tolist()
        is_jpeg = batch.is_jpeg.tolist()
        images: List[Optional[torch.Tensor]] = [None] * N
        skipped: List[Skipped] = []

        ends = batch.jpeg_ends.tolist()
        datas = [batch.jpeg_bytes[start:end] for start, end in zip([0] + ends[:-1], ends)]
        rows = [n for n in range(N) if is_jpeg[n]]
        for n, img in zip(rows, self._decode(datas)):
            if img is not None and tuple(img.shape) == (3, *shapes[n]):
                images[n] = img
                continue
            images[n], boxes[n], flips[n], more = self._fallback(int(batch.indices[n]), int(batch.positions[n]))
            shapes[n] = list(images[n].shape[1:])
            skipped += more
        if batch.levels.numel():
            levels = batch.levels.to(self.device, non_blocking=True)  # [T] uint8, pinned by the loader on CUDA
            start = 0
            for n in range(N):
                if not is_jpeg[n]:
                    H, W = shapes[n]
                    images[n] = levels[start:start + 3 * H * W].view(3, H, W)
                    start += 3 * H * W

        sizes = [3 * H * W for H, W in shapes]
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        pixels = torch.cat([im.reshape(-1) for im in images])  # [T] uint8 on the device
        meta = torch.tensor([[o, *hw, *box] for o, hw, box in zip(starts, shapes, boxes)], dtype=torch.int64)
        flip_t = torch.tensor(flips, dtype=torch.bool)
        if self.device.type == "cuda":
            meta, flip_t = meta.pin_memory(), flip_t.pin_memory()
        meta = meta.to(self.device, non_blocking=True)  # [N, 7]
        out = resized_crop(pixels, meta[:, 0], meta[:, 1:3], meta[:, 3:7], flip_t.to(self.device, non_blocking=True),
                           self.size, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=self.dtype, check=False)
        return out, skipped
