"""self_attention: the qkv projection and multi-head attention of a ViT block, with a backward that writes
dq, dk and dv straight into the packed qkv gradient (no stack and copy) and sums the qkv bias gradient
in the same pass.

``o = self_attention(x, qkv_weight, qkv_bias, num_heads, scale=None, dropout_p=0.0, backend=None)``:
qkv = x @ qkv_weight^T + qkv_bias [B, N, 3*D] (q, k, v heads in timm's layout), o = softmax(q k^T * scale) v
through ``mae_fast.nn.attn_backends`` (``backend``: "auto", "flash", "cudnn", ...; None: the global setting),
returned as [B, N, D]. The GEMMs follow :func:`mae_fast.ops.linear` (autocast dtype, fp32 weight gradient).
Kernel: ``kernels/self_attention.py`` (the packed gradient); plain torch path: :func:`pack_qkv_grad_torch`.
When the backend is "mae_fast" (named, or chosen by "auto") the attention is :mod:`mae_fast.ops.qkv_attention`'s
kernels on the packed qkv, whose backward writes dqkv and the qkv bias gradient itself (no pack step).
"""
from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import self_attention as _k

from ._checks import FLOAT_DTYPES, check_int, check_number, check_ratio, check_shape, check_tensor
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import acc_dtype, autocast_off
from ._triton import launch
from .paths import use_triton
from .linear import compute_dtype, mm_out
from .qkv_attention import attention_backward, attention_forward, check_no_dropout, check_scale, heads, split_heads

__all__ = ["self_attention", "pack_qkv_grad_torch"]


def pack_qkv_grad_torch(dq: Tensor, dk: Tensor, dv: Tensor, need_bias: bool):
    """(dqkv [B*N, 3*D] in dq's dtype, dbias [3*D] fp32, or empty without need_bias)."""
    B, H, N, hd = dq.shape
    dqkv = torch.stack([dq, dk, dv], dim=2).permute(0, 3, 2, 1, 4).reshape(B * N, 3 * H * hd)  # [B*N, 3D]
    dbias = dqkv.sum(0, dtype=acc_dtype(dqkv)) if need_bias else dqkv.new_empty((0,), dtype=torch.float32)
    return dqkv, dbias


@register_op("pack_qkv_grad")
def _pack(dq: Tensor, dk: Tensor, dv: Tensor, need_bias: bool) -> tuple[Tensor, Tensor]:
    if not use_triton(dq):
        return pack_qkv_grad_torch(dq, dk, dv, need_bias)
    B, H, N, hd = dq.shape
    R = B * N
    out = torch.empty((R, 3 * H * hd), dtype=dq.dtype, device=dq.device)
    if out.numel() == 0:
        return out, torch.zeros((3 * H * hd,) if need_bias else (0,), dtype=torch.float32, device=dq.device)
    cfg = _launch.row_tiles(R, hd, target_programs=max(1, 2048 // (3 * H)))
    part = torch.empty((cfg.grid[0], 3 * H * hd) if need_bias else (1,), dtype=torch.float32, device=dq.device)
    launch(_k.pack_qkv_grad_kernel)[(cfg.grid[0], H, 3)](
        dq, dk, dv, out, part, R, N, H, hd, cfg.rows, *dq.stride(), *dk.stride(), *dv.stride(),
        NEED_PART=need_bias, BLOCK_R=cfg.block_r, BLOCK_HD=cfg.block_f, num_warps=cfg.num_warps,
    )
    return out, part.sum(0) if need_bias else torch.empty((0,), dtype=torch.float32, device=dq.device)


class _SelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, scale, dropout_p, backend, dtype):
        from ..nn.attn_backends import _run, resolve_backend  # the backend choice ("auto" measures) lives there

        B, N, C = x.shape
        hd = C // num_heads
        with autocast_off(x):
            x2 = x.reshape(B * N, C).to(dtype)  # [B*N, C]
            w = weight.to(dtype)  # [3C, C]
            qkv = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())  # [B*N, 3C]
            with torch.enable_grad():  # a graph of its own: the attention backend's backward, run in ours
                leaf = qkv.detach().requires_grad_(True)
                q, k, v = leaf.view(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
                name = resolve_backend(q, k, v, backend, dropout_p, scale)
                if name != "mae_fast":
                    o = _run(name, q, k, v, dropout_p, scale)  # [B, H, N, hd]
            if name == "mae_fast":  # the packed qkv in, the packed gradient out: no graph of its own
                check_no_dropout(dropout_p)
                scale = check_scale(scale, hd)
                q, k, v = split_heads(qkv.view(B, N, 3 * C), num_heads)  # [B, H, N, hd] views
                o, lse = attention_forward(q, k, v, scale)  # [B, N, C], [B, H, N]
        a = anchor(x)
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.fast = (num_heads, scale) if name == "mae_fast" else None
        if ctx.fast is not None:
            ctx.save_for_backward(x2, w, qkv, o, lse, a)
            return o, a
        ctx.save_for_backward(x2, w, q, k, v, o, a)  # q, k, v, o carry the attention's own graph
        return o.detach().transpose(1, 2).reshape(B, N, C), a  # [B, N, C]

    @staticmethod
    @once_differentiable("self_attention")
    def backward(ctx, dout):
        x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_bias = bool(need_b and b_dtype is not None)
        with autocast_off(dout):
            if ctx.fast is not None:  # dqkv and the bias gradient straight from the attention's backward
                x2, w, qkv, o, lse, _ = ctx.saved_tensors
                H, scale = ctx.fast
                B, N, C = o.shape
                q, k, v = split_heads(qkv.view(B, N, 3 * C), H)  # [B, H, N, hd] views
                dqkv, dbias = attention_backward(heads(dout.to(o.dtype), H), q, k, v, heads(o, H),
                                                       lse, scale, need_bias)  # [B*N, 3C], [3C]
            else:
                x2, w, q, k, v, o, _ = ctx.saved_tensors
                B, H, N, hd = q.shape
                do = dout.to(o.dtype).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
                # kept for another backward as long as this node keeps o (retain_graph), freed with it otherwise
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
                dqkv, dbias = _pack(dq, dk, dv, need_bias)  # [B*N, 3C], [3C]
            dx = torch.mm(dqkv, w).to(x_dtype).view(x_shape) if need_x else None
            dw = mm_out(dqkv.t(), x2, w_dtype) if need_w else None
        return dx, dw, dbias.to(b_dtype) if need_b and b_dtype is not None else None, None, None, None, None, None


def self_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], num_heads: int, *,
                   scale: Optional[float] = None, dropout_p: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Multi-head self-attention of x [B, N, C] with the qkv projection qkv_weight [3C, C] (+ qkv_bias [3C])
    -> [B, N, C] (the input of the output projection) in the GEMM dtype; autograd to x and the qkv
    parameters."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, C = x.shape
    what = f"a positive int dividing C={C}"
    num_heads = check_int("num_heads", num_heads, 1, what=what)
    if C % num_heads:
        raise ValueError(f"num_heads must be {what}, got {num_heads}")
    check_tensor("qkv_weight", qkv_weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("qkv_weight", qkv_weight, (3 * C, C))
    if qkv_bias is not None:
        check_tensor("qkv_bias", qkv_bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("qkv_bias", qkv_bias, (3 * C,))
    dropout_p = check_ratio("dropout_p", dropout_p)
    if scale is not None:
        scale = check_number("scale", scale)
    return apply(_SelfAttention, "self_attention", x, qkv_weight, qkv_bias, num_heads, scale, dropout_p, backend,
                 compute_dtype(x, qkv_weight))
