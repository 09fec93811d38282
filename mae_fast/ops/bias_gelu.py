"""bias_gelu: the MLP's bias + GELU in one pass, and a backward that gives the bias gradient in the same pass.

``a = bias_gelu(h, bias, approximate="none")``: a = gelu(h + bias) over h [..., F] with bias [F] (or None),
fp32 math, a in h's dtype. GELU is exact (erf), as nn.GELU, unless ``approximate="tanh"``. Kernels:
``kernels/bias_gelu.py``; plain torch path: :func:`bias_gelu_torch` / :func:`bias_gelu_backward_torch`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import bias_gelu as _k

from ._checks import FLOAT_DTYPES, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import autocast_off, dense, rows, unused_pointer, wide
from ._triton import launch
from .paths import use_triton

__all__ = ["bias_gelu", "bias_gelu_torch", "bias_gelu_backward_torch"]
APPROXIMATIONS = ("none", "tanh")


def bias_gelu_torch(h: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """Plain torch forward on rows [R, F]."""
    z = wide(h) if bias is None else wide(h) + wide(bias)
    return F.gelu(z, approximate=approximate).to(h.dtype)


def bias_gelu_backward_torch(da: Tensor, h: Tensor, bias: Optional[Tensor], approximate: str):
    """(dh [R, F] in h's dtype, dbias [F] fp32)."""
    z = wide(h) if bias is None else wide(h) + wide(bias)
    dh = torch.ops.aten.gelu_backward(wide(da), z, approximate=approximate)  # [R, F] fp32
    return dh.to(h.dtype), dh.sum(0)


@register_op("bias_gelu")
def _forward(h: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    if not use_triton(h):
        return bias_gelu_torch(h, bias, approximate)
    R, Fd = h.shape
    a = torch.empty((R, Fd), dtype=h.dtype, device=h.device)
    if a.numel() == 0:
        return a
    cfg = _launch.row_tiles(R, Fd)
    bias = dense(bias)  # the kernel reads it with stride 1
    launch(_k.bias_gelu_fwd_kernel)[cfg.grid](
        h, bias if bias is not None else unused_pointer(h), a, R, Fd, h.stride(0), cfg.rows,
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK_R=cfg.block_r, BLOCK_F=cfg.block_f,
        num_warps=cfg.num_warps,
    )
    return a


@register_op("bias_gelu_backward")
def _backward(da: Tensor, h: Tensor, bias: Optional[Tensor], approximate: str) -> tuple[Tensor, Tensor]:
    if not use_triton(da):
        return bias_gelu_backward_torch(da, h, bias, approximate)
    R, Fd = h.shape
    dh = torch.empty((R, Fd), dtype=h.dtype, device=h.device)
    if dh.numel() == 0:
        return dh, torch.zeros((Fd,), dtype=torch.float32, device=h.device)
    cfg = _launch.row_tiles(R, Fd)
    part = torch.empty((cfg.grid[0], Fd), dtype=torch.float32, device=h.device)
    bias = dense(bias)  # the kernel reads it with stride 1
    launch(_k.bias_gelu_bwd_kernel)[cfg.grid](
        da, h, bias if bias is not None else unused_pointer(h), dh, part, R, Fd, da.stride(0), h.stride(0), cfg.rows,
        HAS_BIAS=bias is not None, TANH=approximate == "tanh", BLOCK_R=cfg.block_r, BLOCK_F=cfg.block_f,
        num_warps=cfg.num_warps,
    )
    return dh, part.sum(0)



class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias, approximate):
        h2 = rows(h)
        a = anchor(h)
        ctx.save_for_backward(h2, bias, a)
        ctx.shape, ctx.approximate = h.shape, approximate
        with autocast_off(h):
            return _forward(h2, bias, approximate).view(h.shape), a

    @staticmethod
    @once_differentiable("bias_gelu")
    def backward(ctx, da):
        h2, bias, _ = ctx.saved_tensors
        with autocast_off(h2):
            dh, dbias = _backward(rows(da), h2, bias, ctx.approximate)
        need_h, need_bias, _ = ctx.needs_input_grad
        return (dh.view(ctx.shape) if need_h else None,
                dbias.to(bias.dtype) if need_bias and bias is not None else None, None)


def bias_gelu(h: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """gelu(h + bias) over the last dim of h [..., F] (bias [F] or None) in h's dtype; autograd to h and bias.
    ``approximate``: "none" (exact, erf) or "tanh", as ``torch.nn.functional.gelu``."""
    check_tensor("h", h, dtypes=FLOAT_DTYPES)
    if h.dim() < 1:
        raise ValueError(f"h must have at least 1 dim, got shape {list(h.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=h.device)
        check_shape("bias", bias, (h.shape[-1],))
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return apply(_BiasGelu, "bias_gelu", h, bias, approximate)
