"""torchrun support of the tools: the process group, ranks, each process's device, wrapping a model in
DistributedDataParallel, and gathering small values from every process."""
from __future__ import annotations

import os
from typing import List

import torch
import torch.nn as nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's global rank from torchrun's environment (RANK), readable before the process group
    starts or after it ends; 0 without torchrun."""
    return int(os.environ.get("RANK", "0"))


def process_device(device: torch.device, flag: str = "--device") -> torch.device:
    """The device of this process: under torchrun with several processes, CUDA is the GPU of the process's
    LOCAL_RANK (``CUDA_VISIBLE_DEVICES`` picks a node's GPUs). ValueError naming ``flag`` for a GPU index
    given to every process, or more processes on a node than it has GPUs."""
    if world_size() <= 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"{flag} {device}: under torchrun every process takes the GPU of its LOCAL_RANK; give "
                         f"{flag} cuda or auto (CUDA_VISIBLE_DEVICES chooses the GPUs a node uses)")
    count, mine = torch.cuda.device_count(), local_rank()
    if mine >= count:
        raise ValueError(f"process LOCAL_RANK {mine} needs GPU {mine}, and this node has {count}: start at most "
                         f"{count} processes per node (--nproc_per_node {count})")
    return torch.device("cuda", mine)


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


def running() -> bool:
    """A process group is running (started by :func:`setup` or by the caller)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    compiled = hasattr(model, "_orig_mod")
    inner = model._orig_mod if compiled else model
    ddp = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(ddp) if compiled else ddp


def backend() -> str:
    """The process group's backend ("nccl", "gloo"), or "" without one."""
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else ""


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``values`` [n] as rows [world, n] (one all_gather; on the values' device, which must
    be the backend's: CUDA for NCCL), or ``values[None]`` without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values[None]
    rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values)
    return torch.stack(rows)


def gather_objects(obj) -> List:
    """Every process's picklable ``obj``, by rank (one all_gather_object), or ``[obj]`` without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_object(out: list, obj) -> None:
    """torch.distributed.all_gather_object: every rank's ``obj`` into ``out`` (one slot per rank)."""
    import torch.distributed

    torch.distributed.all_gather_object(out, obj)
