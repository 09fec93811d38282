"""add_layer_norm: the residual add, LayerNorm and the cast to the next GEMM's dtype in one pass.

``y, s = add_layer_norm(x, weight, bias, eps, branch=None, branch_bias=None, out_dtype=None)``:
s = x + branch + branch_bias (fp32 math, stored in x's dtype: the residual stream) and
y = LayerNorm(s) * weight + bias in ``out_dtype``, with fp32 statistics. Without a branch, s is x itself.
Use s as the residual: the backward then takes the gradient of s from the residual path and of y,
and gives x, branch and branch_bias their gradients in one pass (plus weight and bias, summed
deterministically). Kernels: ``kernels/add_layer_norm.py``; plain torch path: the ``*_torch`` functions.
"""
from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import add_layer_norm as _k

from ._checks import FLOAT_DTYPES, check_number, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import autocast_off, dense, rows, unused_pointer, wide
from ._triton import launch
from .paths import use_triton

__all__ = ["add_layer_norm", "add_layer_norm_torch", "add_layer_norm_backward_torch"]


def add_layer_norm_torch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         branch: Optional[Tensor], branch_bias: Optional[Tensor], out_dtype: torch.dtype):
    """Plain torch forward on rows [R, D]: (y, s (empty without a branch), mean [R], rstd [R])."""
    if branch is not None:
        v = wide(x) + wide(branch)
        if branch_bias is not None:
            v = v + wide(branch_bias)
        s = v.to(x.dtype)
        v = wide(s)
    else:
        s, v = x.new_empty((0,)), wide(x)
    var, mean = torch.var_mean(v, dim=1, unbiased=False)  # [R]
    rstd = torch.rsqrt(var + eps)
    y = (v - mean[:, None]) * rstd[:, None]  # [R, D]
    if weight is not None:
        y = y * wide(weight)
    if bias is not None:
        y = y + wide(bias)
    return y.to(out_dtype), s, mean, rstd


def add_layer_norm_backward_torch(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                                  ds: Optional[Tensor], dz_dtype: torch.dtype, dbr_dtype: Optional[torch.dtype]):
    """(dz [R, D] in dz_dtype, dbranch (empty unless dbr_dtype), sums [3, D] fp32: dweight, dbias, dbranch_bias)."""
    xhat = (wide(s) - mean[:, None]) * rstd[:, None]  # [R, D]
    dyf = wide(dy)
    g = dyf * wide(weight) if weight is not None else dyf
    dz = (g - xhat * (g * xhat).mean(1, keepdim=True) - g.mean(1, keepdim=True)) * rstd[:, None]
    if ds is not None:
        dz = dz + wide(ds)
    sums = torch.stack([(dyf * xhat).sum(0), dyf.sum(0), dz.sum(0)])  # [3, D]
    dbr = dz.to(dbr_dtype) if dbr_dtype is not None else dz.new_empty((0,))
    return dz.to(dz_dtype), dbr, sums


@register_op("add_layer_norm")
def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, branch: Optional[Tensor],
             branch_bias: Optional[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    R, D = x.shape
    if R == 0 or D == 0:  # nothing to normalise, on either path (no launch, no statistics of empty rows)
        stat = torch.zeros((R,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
        return (torch.empty((R, D), dtype=out_dtype, device=x.device),
                torch.empty((R, D) if branch is not None else (0,), dtype=x.dtype, device=x.device), stat, stat.clone())
    if not use_triton(x):
        return add_layer_norm_torch(x, weight, bias, eps, branch, branch_bias, out_dtype)
    y = torch.empty((R, D), dtype=out_dtype, device=x.device)
    s = torch.empty((R, D) if branch is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((R,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    cfg = _launch.row_norm(R, D)
    dummy = unused_pointer(x)
    weight, bias, branch_bias = dense(weight), dense(bias), dense(branch_bias)  # the kernel reads them with stride 1
    launch(_k.add_layer_norm_fwd_kernel)[(cfg.grid,)](
        x, branch if branch is not None else dummy, branch_bias if branch_bias is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        s if branch is not None else dummy, y, mean, rstd,
        R, D, x.stride(0), branch.stride(0) if branch is not None else 0, eps, cfg.rows,
        HAS_BRANCH=branch is not None, HAS_BRANCH_BIAS=branch_bias is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, BLOCK_D=cfg.block_d, CHUNKS=cfg.chunks, num_warps=cfg.num_warps,
    )
    return y, s, mean, rstd


@register_op("add_layer_norm_backward")
def _backward(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, ds: Optional[Tensor],
              dz_dtype: torch.dtype, dbr_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    if not use_triton(dy):
        return add_layer_norm_backward_torch(dy, s, weight, mean, rstd, ds, dz_dtype, dbr_dtype)
    R, D = dy.shape
    dz = torch.empty((R, D), dtype=dz_dtype, device=dy.device)
    dbr = torch.empty((R, D) if dbr_dtype is not None else (0,), dtype=dbr_dtype or dz_dtype, device=dy.device)
    if R == 0:
        return dz, dbr, torch.zeros((3, D), dtype=torch.float32, device=dy.device)
    cfg = _launch.row_norm_partials(R, D)
    part = torch.empty((cfg.grid, 3, D), dtype=torch.float32, device=dy.device)
    dummy = unused_pointer(dy)
    weight = dense(weight)  # the kernel reads it with stride 1
    launch(_k.add_layer_norm_bwd_kernel)[(cfg.grid,)](
        dy, s, weight if weight is not None else dummy, mean, rstd, ds if ds is not None else dummy, dz,
        dbr if dbr_dtype is not None else dummy, part,
        R, D, dy.stride(0), s.stride(0), ds.stride(0) if ds is not None else 0, cfg.rows,
        HAS_W=weight is not None, HAS_DS=ds is not None, STORE_DBR=dbr_dtype is not None, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
    )
    return dz, dbr, part.sum(0)



class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, branch, branch_bias, out_dtype):
        with autocast_off(x):
            x2 = rows(x)
            br2 = rows(branch) if branch is not None else None
            y, s, mean, rstd = _forward(x2, weight, bias, float(eps), br2, branch_bias, out_dtype)
        s2 = s if branch is not None else x2
        a = anchor(x)
        ctx.save_for_backward(s2, weight, mean, rstd, a)
        ctx.shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.branch_dtype = None if branch is None else branch.dtype
        ctx.branch_bias_dtype = None if branch_bias is None else branch_bias.dtype
        s_out = s.view(x.shape) if branch is not None else x  # without a branch, s is x itself
        return y.view(x.shape[:-1] + (x.shape[-1],)), s_out, a

    @staticmethod
    @once_differentiable("add_layer_norm")
    def backward(ctx, dy, ds):
        s2, weight, mean, rstd, _ = ctx.saved_tensors
        shape, x_dtype, has_bias = ctx.shape, ctx.x_dtype, ctx.has_bias
        br_dtype, brb_dtype = ctx.branch_dtype, ctx.branch_bias_dtype
        need_x, need_w, need_b, _, need_br, need_brb, _ = ctx.needs_input_grad
        if dy is None:
            dy = torch.zeros(shape, dtype=x_dtype, device=s2.device)
        with autocast_off(s2):
            dbr_dtype = br_dtype if (need_br and br_dtype is not None and br_dtype != x_dtype) else None
            dz, dbr, sums = _backward(rows(dy), s2, weight, mean, rstd, rows(ds) if ds is not None else None,
                                      x_dtype, dbr_dtype)
        dz = dz.view(shape)
        dbranch = None
        if need_br and br_dtype is not None:
            dbranch = dbr.view(shape) if dbr_dtype is not None else dz
        return (dz if need_x else None,
                sums[0].to(weight.dtype) if need_w and weight is not None else None,
                sums[1].to(weight.dtype if weight is not None else x_dtype) if need_b and has_bias else None,
                None, dbranch,
                sums[2].to(brb_dtype) if need_brb and brb_dtype is not None else None,
                None)


def add_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5, *,
                   branch: Optional[Tensor] = None, branch_bias: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None):
    """(y, s): s = x + branch + branch_bias in x's dtype (x itself without a branch), y = LayerNorm(s) over
    the last dim (weight and bias [D] or None) in ``out_dtype`` (default x's dtype); fp32 statistics.

    x and branch [..., D]; branch_bias [D] needs a branch. Autograd to every tensor input."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim, got shape {list(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("branch_bias", branch_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
            check_shape(name, t, (D,))
    if branch is not None:
        check_tensor("branch", branch, dtypes=FLOAT_DTYPES, device=x.device)
        if branch.shape != x.shape:
            raise ValueError(f"branch must have x's shape {list(x.shape)}, got {list(branch.shape)}")
    elif branch_bias is not None:
        raise ValueError("branch_bias needs a branch")
    if out_dtype is None:
        out_dtype = x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype}")
    eps = check_number("eps", eps, minimum=0.0)
    return apply(_AddLayerNorm, "add_layer_norm", x, weight, bias, eps, branch, branch_bias, out_dtype)
