"""One built variant of a benchmark: its model and optimizer, one training step, its step timings; and the
pool of random input batches every variant shares."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, List, Optional

import torch

from .. import timing
from . import flops
from .distributed import wrap_ddp
from .variants import GRAPH, VARIANTS, flops_options

if TYPE_CHECKING:
    from .bench import BenchConfig


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


class Runner:
    """A built variant: model, optimizer, one training step, its timings."""

    def __init__(self, name: str, cfg: BenchConfig, device: torch.device, imgs_pool, distributed: bool):
        self.name = name
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)  # same initial weights for every variant (and every rank)
        model = VARIANTS[name](cfg, device)
        model.train()
        self.dims = flops.dims_of(model)
        self.flops_opts = flops_options(name, model)
        self.dtype = cfg.resolved_dtype()
        self.train_step = None  # mae_fast.TrainStep for the +graph variant
        graph_opt = dict(fused=True, capturable=True) if name == GRAPH and device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, **graph_opt)
        if name == GRAPH:
            from ..train import TrainStep

            self.train_step = TrainStep(model, self.opt, cfg.mask_ratio, amp=self.dtype, cuda_graph=True)
        self.model = wrap_ddp(model, device) if distributed else model
        self.imgs_pool = imgs_pool
        self.i = 0
        self.timer = timing.StepTimer(device)
        self.peak_bytes = 0
        self.resident_bytes = 0
        self.allocated_before = 0  # what the process held before this variant was built (CUDA)
        self.capture_peak_bytes = 0  # +graph: the allocator peak while its step was captured
        self.last_loss: Optional[torch.Tensor] = None

    @property
    def graphed(self) -> bool:
        return self.train_step is not None and self.train_step.graphed

    def step(self) -> torch.Tensor:
        imgs = self.imgs_pool[self.i % len(self.imgs_pool)]
        self.i += 1
        if self.train_step is not None:
            return self.train_step(imgs)
        with autocast(self.device, self.dtype):
            out = self.model(imgs, mask_ratio=self.cfg.mask_ratio)
        loss = out[0] if isinstance(out, (tuple, list)) else out  # reference: (loss, pred, mask); fast: loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def warm_up(self, n: int, bar=None) -> None:
        """``n`` untimed steps; the +graph variant steps on until its step is captured, so that every timed
        step is a replay (its capture peak is recorded: a replay allocates nothing new)."""
        i = 0
        while i < n or (self.graphed and not self.train_step.captured):
            capturing = self.graphed and not self.train_step.captured
            if capturing:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            i += 1
            if capturing and self.train_step.captured:
                self.capture_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            if bar is not None and i <= n:
                bar.update(1)

    def timed_step(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.timer:
            self.last_loss = self.step()
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    @property
    def times(self) -> List[float]:
        """Every timed step's milliseconds so far."""
        return self.timer.collect()


def images(cfg: BenchConfig, dims: flops.MAEDims, device: torch.device, rank: int) -> List[torch.Tensor]:
    """Three random batches: images [N, C, H, W], or clips [N, C, T, H, W] for a video model."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + 17 + rank)
    # a few distinct random batches, rotated (never zeros; no single buffer that stays in cache)
    return [torch.randn(*dims.input_shape(cfg.batch_size), generator=g).to(device) for _ in range(3)]
