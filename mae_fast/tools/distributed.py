"""torchrun support of the tools: the process group, ranks, and wrapping a model in DistributedDataParallel."""
from __future__ import annotations

import os

import torch
import torch.nn as nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> bool:
    """Start the process group under torchrun; True when running distributed."""
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def finish() -> None:
    """End the process group :func:`setup` started: all ranks wait for each other (rank 0 writes the
    files first), then tear down together. A rank that leaves early can hang the others in gloo's
    teardown (seen with two CPU processes)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    compiled = hasattr(model, "_orig_mod")
    inner = model._orig_mod if compiled else model
    ddp = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(ddp) if compiled else ddp


def all_gather_object(out: list, obj) -> None:
    """torch.distributed.all_gather_object: every rank's ``obj`` into ``out`` (one slot per rank)."""
    import torch.distributed

    torch.distributed.all_gather_object(out, obj)
