"""qkv_attention: multi-head softmax attention read straight from the qkv projection's output, with a backward
that writes the packed gradient of that output (no split, no pack step).

``o = qkv_attention(qkv, num_heads, scale=None)``: qkv [B, N, 3C] with columns (part, head, j) (timm's layout,
``qkv.reshape(B, N, 3, H, hd)``) -> o = softmax(q k^T * scale) v as [B, N, C] (what the output projection
reads); autograd to qkv. ``attention(q, k, v, scale=None)``: the same on q, k, v [B, H, N, hd] of any strides
(views into one qkv buffer are read in place) -> [B, H, N, hd]; autograd to q, k, v. No mask, no dropout.
``scale`` defaults to hd ** -0.5. fp32 softmax statistics and accumulation; the output and the gradients are in
the inputs' dtype (under autocast: the autocast dtype, as SDPA). Deterministic: no atomics.
Kernels: ``kernels/qkv_attention.py``; plain torch path: :func:`qkv_attention_torch` /
:func:`qkv_attention_backward_torch` (fp32 math, float64 stays float64). The registered ops
``torch.ops.mae_fast.qkv_attention`` and ``qkv_attention_backward`` declare their useful FLOPs
(4 B H N^2 hd forward, 2.5 times that backward) to ``torch.utils.flop_counter``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from mae_fast.kernels import qkv_attention as _k

from ._checks import FLOAT_DTYPES, check_int, check_number, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import autocast_dtype, autocast_off, no_grad_placeholder, unused_pointer, wide
from ._triton import launch
from .paths import use_triton

__all__ = ["qkv_attention", "attention", "attention_forward", "attention_backward", "qkv_attention_torch",
           "qkv_attention_backward_torch", "split_heads", "heads", "check_scale", "check_no_dropout"]

_LOG2E = 1.4426950408889634


def split_heads(qkv: Tensor, num_heads: int):
    """(q, k, v) [B, H, N, hd]: views into qkv [B, N, 3C] (columns (part, head, j))."""
    B, N, C3 = qkv.shape
    hd = C3 // (3 * num_heads)
    return qkv.view(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]


def heads(t: Tensor, num_heads: int) -> Tensor:
    """[B, N, H*hd] -> [B, H, N, hd] (a view when the strides allow)."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def qkv_attention_torch(q: Tensor, k: Tensor, v: Tensor, scale: float):
    """Plain torch forward: (o [B, N, H*hd] in q's dtype, lse [B, H, N]: the base-2 log-sum-exp of each row of
    q k^T * scale * log2(e), fp32, float64 for float64 inputs)."""
    B, H, N, hd = q.shape
    s = torch.matmul(wide(q), wide(k).transpose(-1, -2)) * scale  # [B, H, N, N]
    o = torch.matmul(torch.softmax(s, dim=-1), wide(v))  # [B, H, N, hd]
    return o.transpose(1, 2).reshape(B, N, H * hd).to(q.dtype), torch.logsumexp(s, dim=-1) * _LOG2E  # [B, H, N]


def qkv_attention_backward_torch(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float,
                                 need_bias: bool):
    """Plain torch backward: (dqkv [B*N, 3*H*hd] in q's dtype, the packed layout of qkv; dbias [3*H*hd], the
    column sums of dqkv in fp32 (float64 for float64), or an empty tensor without need_bias)."""
    B, H, N, hd = q.shape
    qw, kw, vw, dow = wide(q), wide(k), wide(v), wide(do)
    p = torch.softmax(torch.matmul(qw, kw.transpose(-1, -2)) * scale, dim=-1)  # [B, H, N, N]
    dp = torch.matmul(dow, vw.transpose(-1, -2))  # [B, H, N, N]
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale  # [B, H, N, N]
    grads = (torch.matmul(ds, kw), torch.matmul(ds.transpose(-1, -2), qw), torch.matmul(p.transpose(-1, -2), dow))
    dqkv = torch.stack(grads, dim=2).permute(0, 3, 2, 1, 4).reshape(B * N, 3 * H * hd)  # [B*N, 3*H*hd]
    dbias = dqkv.sum(0) if need_bias else no_grad_placeholder(q)
    return dqkv.to(q.dtype), dbias


def _precision(t: Tensor) -> str:
    """The kernels' PRECISION: exact fp32 products for fp32 inputs (no TF32); bfloat16 products widened to fp32
    under Triton's interpreter (its dot multiplies bfloat16 operands as raw bits)."""
    if t.dtype == torch.float32:
        return "ieee"
    interpreted = t.device.type == "cpu" and not is_fake(t)  # fake CPU tensors stand for CUDA ones in tools
    return "upcast" if t.dtype == torch.bfloat16 and interpreted else "tf32"


@register_op("qkv_attention")
def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q, k, v [B, H, N, hd] (any strides) -> (o [B, N, H*hd] in q's dtype, lse [B, H, N] fp32: the base-2
    log-sum-exp of each row of q k^T * scale * log2(e), which the backward reads)."""
    if not use_triton(q):
        return qkv_attention_torch(q, k, v, scale)
    B, H, N, hd = q.shape
    o = torch.empty((B, N, H * hd), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if lse.numel() == 0 or hd == 0:  # no rows, or rows of no columns: uniform attention over N keys
        return o, lse.fill_(math.log2(N) if N else 0.0)
    t = _k.forward_tiles(N, hd)
    o4 = o.view(B, N, H, hd)
    launch(_k.qkv_attention_fwd_kernel)[(B * H * t.blocks,)](
        q, k, v, o, lse, H, N, hd, scale * _LOG2E, *q.stride(), *k.stride(), *v.stride(),
        o4.stride(0), o4.stride(2), o4.stride(1), o4.stride(3),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, PRECISION=_precision(q), num_warps=t.num_warps,
    )
    return o, lse


@register_op("qkv_attention_backward")
def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
                       need_bias: bool) -> tuple[Tensor, Tensor]:
    """do, o [B, H, N, hd] (any strides) -> (dqkv [B*N, 3*H*hd], dbias [3*H*hd] fp32 or empty). The torch
    path recomputes P with a softmax and takes delta = rowsum(P * dP): it reads neither o nor lse."""
    if not use_triton(q):
        return qkv_attention_backward_torch(do, q, k, v, lse, scale, need_bias)
    B, H, N, hd = q.shape
    dqkv = torch.empty((B * N, 3 * H * hd), dtype=q.dtype, device=q.device)
    if dqkv.numel() == 0:
        return dqkv, (torch.zeros((3 * H * hd,), dtype=torch.float32, device=q.device) if need_bias
                      else no_grad_placeholder(q))
    t = _k.backward_tiles(N, hd)
    dq, dk, dv = split_heads(dqkv.view(B, N, 3 * H * hd), H)  # [B, H, N, hd] views into dqkv
    nb = 1 if t.whole else t.blocks // 2
    part = (torch.empty((nb, B, 3 * H * hd), dtype=torch.float32, device=q.device) if need_bias
            else unused_pointer(lse))
    launch(_k.qkv_attention_bwd_kernel)[(B * H * t.blocks,)](
        q, k, v, o, do, lse, dq, dk, dv, part, B, H, N, hd, scale, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        WHOLE=t.whole, NEED_PART=need_bias, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        PRECISION=_precision(q), num_warps=t.num_warps,
    )
    return dqkv, part.view(nb * B, 3 * H * hd).sum(0) if need_bias else no_grad_placeholder(q)


@register_flop_formula(torch.ops.mae_fast.qkv_attention)
def _forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Useful FLOPs: q k^T and P v, 2 * B*H*N*N*hd each (no padding)."""
    B, H, N, hd = q_shape
    return 4 * B * H * N * k_shape[2] * hd


@register_flop_formula(torch.ops.mae_fast.qkv_attention_backward)
def _backward_flops(do_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """Useful FLOPs: 2.5 times the forward's (dV, dP, dQ, dK and the recomputed scores)."""
    B, H, N, hd = q_shape
    return 10 * B * H * N * k_shape[2] * hd


class _QkvAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        with autocast_off(qkv):
            o, lse = attention_forward(*split_heads(qkv, num_heads), scale)  # [B, N, C], [B, H, N]
        anc = anchor(qkv)
        ctx.save_for_backward(qkv, o, lse, anc)
        ctx.num_heads, ctx.scale = num_heads, scale
        return o, anc

    @staticmethod
    @once_differentiable("qkv_attention")
    def backward(ctx, do):
        qkv, o, lse, _ = ctx.saved_tensors
        H = ctx.num_heads
        with autocast_off(do):
            dqkv, _ = attention_backward(heads(do.to(o.dtype), H), *split_heads(qkv, H), heads(o, H), lse, ctx.scale,
                                         False)  # [B*N, 3C]
        return dqkv.view(qkv.shape), None, None


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        with autocast_off(q):
            o, lse = attention_forward(q, k, v, scale)  # [B, N, H*hd], [B, H, N]
        anc = anchor(q)
        ctx.save_for_backward(q, k, v, o, lse, anc)
        ctx.scale = scale
        return heads(o, q.shape[1]), anc  # [B, H, N, hd], a view of o

    @staticmethod
    @once_differentiable("attention")
    def backward(ctx, do):
        q, k, v, o, lse, _ = ctx.saved_tensors
        B, H, N, hd = q.shape
        with autocast_off(do):
            dqkv, _ = attention_backward(do.to(o.dtype), q, k, v, heads(o, H), lse, ctx.scale, False)
        dq, dk, dv = split_heads(dqkv.view(B, N, 3 * H * hd), H)  # [B, H, N, hd] views into dqkv
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None


def check_scale(scale, hd: int) -> float:
    """The softmax scale as a float: hd ** -0.5 for None, else a finite real number (ValueError/TypeError)."""
    if scale is None:
        return hd ** -0.5 if hd else 1.0
    value = check_number("scale", scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_no_dropout(dropout_p: float) -> None:
    """The kernels have no dropout: a ValueError for dropout_p > 0 (an attention backend's caller asked for it)."""
    if dropout_p > 0:
        raise ValueError(f"attn_backend='mae_fast' has no dropout, got dropout_p={dropout_p} (choose another "
                         f"backend for attention dropout)")


def _compute(t: Tensor) -> Tensor:
    """t in the autocast dtype where autocast is on for its device (as SDPA under autocast), float64 aside."""
    dtype = autocast_dtype(t)
    return t.to(dtype) if dtype is not None and t.dtype != torch.float64 else t


def qkv_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v of the heads packed in qkv [B, N, 3C] (columns (part, head, j)) -> [B, N, C];
    autograd to qkv (its gradient comes back packed, in qkv's dtype)."""
    check_tensor("qkv", qkv, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, C3 = qkv.shape
    if C3 % 3:
        raise ValueError(f"qkv's last dim must be 3 * C (q, k, v), got shape {list(qkv.shape)}")
    C = C3 // 3
    what = f"a positive int dividing C={C}"
    num_heads = check_int("num_heads", num_heads, 1, what=what)
    if C % num_heads:
        raise ValueError(f"num_heads must be {what}, got {num_heads}")
    scale = check_scale(scale, C // num_heads)
    return apply(_QkvAttention, "qkv_attention", _compute(qkv), num_heads, scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v for q, k, v [B, H, N, hd] of any strides -> [B, H, N, hd] (a view of a
    [B, N, H*hd] tensor); autograd to q, k and v."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
        check_shape(name, t, q.shape)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {str(q.dtype).replace('torch.', '')}, "
                            f"got {str(t.dtype).replace('torch.', '')}")
    scale = check_scale(scale, q.shape[-1])
    return apply(_Attention, "attention", _compute(q), _compute(k), _compute(v), scale)
