"""Training batches on the device, from either loader, with the time the training loop waited for them.

``Batches(paths, size, batch_size, device=..., loader="auto")`` is an endless iterator of [N, 3, S, S]
batches in ``dtype`` on ``device``, from one of two loaders:

- ``loader="cpu"``: Pillow in the loader workers (``cpu_folder``); the 8-bit batch crosses to the device
  (pinned) and is normalised there.
- ``loader="gpu"``: the workers only read files and draw boxes and flips (``gpu_folder``); nvJPEG decodes on
  the device and one kernel makes the samples (``device_decode``). On a CPU device this is the path's CPU
  twin (Pillow decodes, the op's torch path resizes).
- ``loader="auto"``: gpu on CUDA, cpu elsewhere.

Both give the same samples for the same seed: the same images, boxes and flips, pixels within one
8-bit level where the JPEG decoders agree (docs/PRETRAIN.md). Unreadable files are replaced by the next
readable image (``skips``) and reported once each through ``on_skip``, the same with and without worker
processes. ``wait_s`` adds up the seconds ``next()`` took (the time a training loop waited for data).

Several processes (``rank`` of ``world_size``, e.g. under torchrun): ``batch_size`` is the global batch, and
each process gets its part, ``batch_size / world_size`` consecutive samples of each global batch
(``StreamSampler``). With ``mask_noise=n`` each batch comes with its samples' mask noise ([N, n] float32,
``masks``), keyed by position as the crops are: ``next()`` then returns ``(imgs, noise)``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .cpu_folder import ImageFolder, collate_levels
from .decode import UnreadableImage
from .device_decode import DeviceDecoder
from .gpu_folder import EncodedFolder, collate_encoded
from .masks import CollateWithNoise, WithNoise
from .normalize import normalize
from .sampler import StreamSampler
from .skips import SkipLog

LOADERS = ("auto", "cpu", "gpu")


def default_workers(processes: int = 1) -> int:
    """Loader processes when none are asked for, for each of ``processes`` training processes sharing the
    machine: half of its share of the cores less one, at most 8 (0 on two cores)."""
    return min(8, max(0, (os.cpu_count() or 1) // max(1, processes) // 2 - 1))


def resolve_loader(loader: str, device) -> str:
    """"cpu" or "gpu" for ``loader`` ("auto", "cpu" or "gpu") on ``device``."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    if loader == "auto":
        return "gpu" if torch.device(device).type == "cuda" else "cpu"
    return loader


class Batches:
    """Endless training batches [batch_size / world_size, 3, size, size] on ``device``, from global batch
    ``start_step`` of the data stream of ``seed`` on (see the module docstring)."""

    def __init__(self, paths: Sequence[Path], size: int, batch_size: int, *, seed: int = 0, start_step: int = 0,
                 workers: int = 0, device="cpu", loader: str = "auto", dtype: torch.dtype = torch.float32,
                 cache: Optional[bool] = None, on_skip: Optional[Callable[[str, str], None]] = None,
                 rank: int = 0, world_size: int = 1, mask_noise: Optional[int] = None):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split into {world_size} equal parts (one per process)")
        self.device = torch.device(device)
        self.kind = resolve_loader(loader, self.device)  # "cpu" or "gpu"
        self.dtype = dtype
        if self.kind == "gpu":
            self.dataset = EncodedFolder(paths, seed)
            self.decoder: Optional[DeviceDecoder] = DeviceDecoder(self.dataset, size, self.device, dtype)
            collate = collate_encoded
        else:
            self.dataset = ImageFolder(paths, size, seed, cache)
            self.decoder = None
            collate = collate_levels
        dataset = self.dataset
        self.mask_noise = mask_noise
        if mask_noise is not None:
            dataset, collate = WithNoise(self.dataset, seed, mask_noise), CollateWithNoise(collate)
        sampler = StreamSampler(len(paths), seed, start_step * batch_size, batch_size=batch_size, rank=rank,
                                world_size=world_size)
        # the loader has its own generator: it draws nothing from torch's global one
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size // world_size, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
            persistent_workers=False)
        self.skips = SkipLog()
        self.on_skip = on_skip
        self.wait_s = 0.0
        self._it = None

    def __iter__(self) -> "Batches":
        return self

    def __next__(self):
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(self.loader)
        batch, noise = next(self._it) if self.mask_noise is not None else (next(self._it), None)
        self._report(batch.skipped)
        if batch.error:
            raise UnreadableImage(batch.error)
        if self.decoder is not None:
            out, skipped = self.decoder(batch)
            self._report(skipped)
        else:
            out = normalize(batch.levels.to(self.device, non_blocking=True), self.dtype)
        if noise is not None:
            out = out, noise.to(self.device, non_blocking=True)
        self.wait_s += time.perf_counter() - t0
        return out

    def _report(self, skipped) -> None:
        for path, why in self.skips.add(skipped):
            if self.on_skip is not None:
                self.on_skip(path, why)

    def close(self) -> None:
        """Stop the loader's worker processes (a later ``next`` starts them again)."""
        self._it = None
