"""residual_add: a block's last residual add, s + branch + bias, and a backward that gives the branch's
gradient in its dtype and the bias gradient in one pass.

``out = residual_add(s, branch, bias=None)``: s and branch [..., D], bias [D]; fp32 math, out in s's dtype
(the residual stream, fp32 under autocast). Kernels: ``kernels/residual_add.py``; plain torch path:
:func:`residual_add_torch` / :func:`residual_add_backward_torch`.
"""
from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import residual_add as _k

from ._checks import FLOAT_DTYPES, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import autocast_off, dense, rows, unused_pointer, wide
from ._triton import launch
from .paths import use_triton

__all__ = ["residual_add", "residual_add_torch", "residual_add_backward_torch"]


def residual_add_torch(s: Tensor, branch: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Plain torch forward on rows [R, D]."""
    v = wide(s) + wide(branch)
    return (v if bias is None else v + wide(bias)).to(s.dtype)


def residual_add_backward_torch(dout: Tensor, dbr_dtype: Optional[torch.dtype]):
    """(dbranch [R, D] in dbr_dtype, or empty without one; dbias [D] fp32)."""
    dbr = dout.to(dbr_dtype) if dbr_dtype is not None else dout.new_empty((0,))
    return dbr, wide(dout).sum(0)


@register_op("residual_add")
def _forward(s: Tensor, branch: Tensor, bias: Optional[Tensor]) -> Tensor:
    if not use_triton(s):
        return residual_add_torch(s, branch, bias)
    R, D = s.shape
    out = torch.empty((R, D), dtype=s.dtype, device=s.device)
    if out.numel() == 0:
        return out
    cfg = _launch.row_tiles(R, D)
    bias = dense(bias)  # the kernel reads it with stride 1
    launch(_k.residual_add_fwd_kernel)[cfg.grid](
        s, branch, bias if bias is not None else unused_pointer(s), out, R, D, s.stride(0), branch.stride(0),
        cfg.rows, HAS_BIAS=bias is not None, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_f, num_warps=cfg.num_warps,
    )
    return out


@register_op("residual_add_backward")
def _backward(dout: Tensor, dbr_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    if not use_triton(dout):
        return residual_add_backward_torch(dout, dbr_dtype)
    R, D = dout.shape
    dbr = torch.empty((R, D) if dbr_dtype is not None else (0,), dtype=dbr_dtype or dout.dtype, device=dout.device)
    if R * D == 0:
        return dbr, torch.zeros((D,), dtype=torch.float32, device=dout.device)
    cfg = _launch.row_tiles(R, D)
    part = torch.empty((cfg.grid[0], D), dtype=torch.float32, device=dout.device)
    launch(_k.residual_add_bwd_kernel)[cfg.grid](
        dout, dbr if dbr_dtype is not None else unused_pointer(dout), part, R, D, dout.stride(0), cfg.rows,
        STORE_DBR=dbr_dtype is not None, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_f, num_warps=cfg.num_warps,
    )
    return dbr, part.sum(0)



class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, branch, bias):
        ctx.meta = (s.shape, s.dtype, branch.dtype, None if bias is None else bias.dtype)
        a = anchor(s)
        ctx.save_for_backward(a)
        with autocast_off(s):
            return _forward(rows(s), rows(branch), bias).view(s.shape), a

    @staticmethod
    @once_differentiable("residual_add")
    def backward(ctx, dout):
        shape, s_dtype, br_dtype, bias_dtype = ctx.meta
        need_s, need_br, need_bias = ctx.needs_input_grad
        if not (need_br or need_bias):
            return dout, None, None
        dbr_dtype = br_dtype if need_br and br_dtype != dout.dtype else None
        with autocast_off(dout):
            dbr, dbias = _backward(rows(dout), dbr_dtype)
        dbranch = (dbr.view(shape) if dbr_dtype is not None else dout) if need_br else None
        return dout if need_s else None, dbranch, dbias.to(bias_dtype) if need_bias else None


def residual_add(s: Tensor, branch: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """s + branch + bias in s's dtype (fp32 math); s and branch [..., D], bias [D] or None; autograd to all."""
    check_tensor("s", s, dtypes=FLOAT_DTYPES)
    check_tensor("branch", branch, dtypes=FLOAT_DTYPES, device=s.device)
    if s.dim() < 1:
        raise ValueError(f"s must have at least 1 dim ([..., D]), got shape {list(s.shape)}")
    if branch.shape != s.shape:
        raise ValueError(f"branch must have s's shape {list(s.shape)}, got {list(branch.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=s.device)
        check_shape("bias", bias, (s.shape[-1],))
    return apply(_ResidualAdd, "residual_add", s, branch, bias)
