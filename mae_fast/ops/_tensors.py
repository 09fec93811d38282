"""Small tensor utilities of the ops: compute dtypes, the row layout of the row kernels, placeholders."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in the dtype the torch paths compute in: float64 stays float64, anything else becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulator dtype of a sum of ``t``: float64 for float64, else fp32 (``t.sum(dtype=...)`` reduces
    in it without an fp32 copy of t)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [R, D] with a unit last stride (a view when possible): the layout of the row kernels."""
    t2 = t.reshape(t.shape[:-1].numel(), t.shape[-1])  # also for 0 columns, where -1 is ambiguous
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A [D] parameter (weight, bias) with a unit stride, as the row kernels read it: the tensor itself when
    contiguous, else a copy of its D values (a strided or expanded view: one small launch); None stays None."""
    return None if t is None else t.contiguous()


def no_grad_placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward kernel returns for a gradient nobody needs: a fresh empty fp32 tensor (registered
    ops return tensors, and outputs never alias)."""
    return torch.empty((0,), dtype=torch.float32, device=like.device)


def unused_pointer(like: torch.Tensor) -> torch.Tensor:
    """A 1-element stand-in for a pointer argument a kernel variant never touches."""
    return torch.empty((1,), dtype=like.dtype, device=like.device)


def autocast_off(t: torch.Tensor):
    """A context without autocast on ``t``'s device: ops choose their dtypes themselves."""
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(t: torch.Tensor):
    """The autocast dtype on ``t``'s device, or None when autocast is off there."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None
