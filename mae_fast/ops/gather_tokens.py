"""gather_tokens: the encoder's visible tokens in one pass, optionally with their positions and prefix rows.

x [N, L, D], ids_keep [N, K] -> [N, P+K, D]: out[n, :P] = prefix[0]; out[n, P+k] = x[n, ids_keep[n, k]]
(+ pos_embed[0, ids_keep[n, k]]). Kernels: ``kernels/gather_tokens.py``; plain torch path:
:func:`gather_tokens_torch` / :func:`gather_tokens_backward_torch`. Any ids are safe (``_indices.py``): one
outside [0, L) gives a NaN row, a repeated one the summed gradient.
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import gather_tokens as _k

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_distinct_rows, check_indices_enabled, check_shape, check_tensor
from ._indices import index_map, poison_rows, valid_and_clamped
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import no_grad_placeholder, unused_pointer, wide
from ._triton import launch
from .paths import use_triton

__all__ = ["gather_tokens", "gather_tokens_torch", "gather_tokens_backward_torch"]


def gather_tokens_torch(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor], prefix: Optional[Tensor]) -> Tensor:
    """Plain torch forward (the CPU path and the oracle); position add in fp32, one rounding."""
    N, L, D = x.shape
    valid, idx, all_valid = valid_and_clamped(ids_keep, L)  # [N, K]
    out = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D))  # [N, K, D], a new tensor
    if pos_embed is not None:
        out = (wide(out) + wide(pos_embed[0])[idx]).to(x.dtype)  # [N, K, D]
    out = poison_rows(out, valid, all_valid)
    if prefix is not None:
        out = torch.cat([prefix.to(x.dtype).expand(N, -1, -1), out], dim=1)  # [N, P+K, D]
    return out.contiguous()


def gather_tokens_backward_torch(grad: Tensor, ids_keep: Tensor, L: int, P: int, need_x: bool, need_pos: bool,
                                 need_prefix: bool):
    """(grad_x [N, L, D], grad_pos [1, L, D] fp32, grad_prefix [1, P, D] fp32); unneeded ones empty."""
    N, _, D = grad.shape
    valid, idx, all_valid = valid_and_clamped(ids_keep, L)  # [N, K]
    g = wide(grad[:, P:])  # [N, K, D] (fp32, float64 for float64)
    if not all_valid:
        g = g.masked_fill(~valid.unsqueeze(-1), 0.0)  # an invalid id's row fed no input
    gx = torch.zeros(N, L, D, dtype=g.dtype, device=grad.device)
    gx.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, D), g)  # [N, L, D]: repeated ids add up
    gpos = gx.sum(0, keepdim=True) if need_pos else no_grad_placeholder(grad)
    gpre = wide(grad[:, :P]).sum(0, keepdim=True) if need_prefix else no_grad_placeholder(grad)
    return (gx.to(grad.dtype) if need_x else grad.new_empty((0,))), gpos, gpre


@register_op("gather_tokens")
def _forward(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor], prefix: Optional[Tensor]) -> Tensor:
    if not use_triton(x):
        return gather_tokens_torch(x, ids_keep, pos_embed, prefix)
    N, _, D = x.shape
    P = 0 if prefix is None else prefix.shape[1]
    T = P + ids_keep.shape[1]
    out = torch.empty((N, T, D), dtype=x.dtype, device=x.device)  # [N, P+K, D]
    if out.numel() == 0:
        return out
    cfg = _launch.row_copy(D)
    pos = pos_embed if pos_embed is not None else x
    pre = prefix if prefix is not None else x
    launch(_k.gather_tokens_fwd_kernel)[(triton.cdiv(N * T, cfg.block_rows), triton.cdiv(D, cfg.block_cols))](
        x, ids_keep, pos, pre, out,
        N * T, T, P, D, x.shape[1],
        x.stride(0), x.stride(1), x.stride(2),
        ids_keep.stride(0), ids_keep.stride(1),
        pos.stride(1), pos.stride(2),
        pre.stride(1), pre.stride(2),
        HAS_POS=pos_embed is not None, HAS_PREFIX=prefix is not None,
        BLOCK_R=cfg.block_rows, BLOCK_D=cfg.block_cols, num_warps=cfg.num_warps,
    )
    return out


@register_op("gather_tokens_backward")
def _backward(grad: Tensor, ids_keep: Tensor, L: int, P: int, need_x: bool, need_pos: bool,
              need_prefix: bool) -> tuple[Tensor, Tensor, Tensor]:
    if not use_triton(grad):
        return gather_tokens_backward_torch(grad, ids_keep, L, P, need_x, need_pos, need_prefix)
    N, _, D = grad.shape
    gx = torch.empty((N, L, D) if need_x else (0,), dtype=grad.dtype, device=grad.device)
    if N == 0 or D == 0 or P + L == 0:  # nothing to launch over
        gpos = torch.zeros((1, L, D), dtype=torch.float32, device=grad.device) if need_pos else no_grad_placeholder(grad)
        gpre = torch.zeros((1, P, D), dtype=torch.float32, device=grad.device) if need_prefix else no_grad_placeholder(grad)
        return gx.zero_(), gpos, gpre
    cfg = _launch.column_split(N, P + L, D)
    part = torch.empty((cfg.splits, P + L, D) if need_pos or need_prefix else (1,), dtype=torch.float32,
                       device=grad.device)
    code, nxt = index_map(ids_keep, L)  # [N, L], [N, K]
    launch(_k.gather_tokens_bwd_kernel)[(P + L, triton.cdiv(D, cfg.block_d), cfg.splits)](
        grad, code, nxt, gx if need_x else unused_pointer(grad), part,
        N, L, P, ids_keep.shape[1], D, cfg.chunk_n,
        grad.stride(0), grad.stride(1), grad.stride(2),
        NEED_X=need_x, NEED_POS=need_pos, NEED_PREFIX=need_prefix,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )
    gpos = part[:, P:].sum(0, keepdim=True) if need_pos else no_grad_placeholder(grad)  # [1, L, D]
    gpre = part[:, :P].sum(0, keepdim=True) if need_prefix else no_grad_placeholder(grad)  # [1, P, D]
    return gx, gpos, gpre


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_keep, pos_embed, prefix):
        a = anchor(x)
        ctx.save_for_backward(ids_keep, a)
        ctx.L, ctx.P = x.shape[1], 0 if prefix is None else prefix.shape[1]
        ctx.dtypes = (x.dtype, None if pos_embed is None else pos_embed.dtype,
                      None if prefix is None else prefix.dtype)
        return _forward(x, ids_keep, pos_embed, prefix), a

    @staticmethod
    @once_differentiable("gather_tokens")
    def backward(ctx, grad):
        ids_keep, _ = ctx.saved_tensors
        x_dtype, pos_dtype, prefix_dtype = ctx.dtypes
        need_x, _, need_pos, need_prefix = ctx.needs_input_grad
        need_pos, need_prefix = need_pos and pos_dtype is not None, need_prefix and prefix_dtype is not None
        gx, gpos, gpre = _backward(grad, ids_keep, ctx.L, ctx.P, need_x, need_pos, need_prefix)
        return (gx.to(x_dtype) if need_x else None, None,
                gpos.to(pos_dtype) if need_pos else None, gpre.to(prefix_dtype) if need_prefix else None)


def gather_tokens(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor] = None, prefix: Optional[Tensor] = None,
                  *, check_indices: Optional[bool] = None) -> Tensor:
    """Visible tokens, optionally with their positions added and prefix rows prepended.

    x [N, L, D], ids_keep [N, K] int32/int64 (distinct entries of [0, L) per row), pos_embed [1, L, D],
    prefix [1, P, D] -> [N, P+K, D] in x's dtype; autograd to x, pos_embed and prefix.

    ``check_indices`` (default: on for CPU tensors, else ``MAE_FAST_CHECK_INDICES``): a ValueError for ids
    outside [0, L) or repeated in a row (a device sync on CUDA). Unchecked, an id outside [0, L) gives a NaN
    row and a repeated id the summed gradient (as torch.gather), on every path.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    N, L, D = x.shape
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    check_shape("ids_keep", ids_keep, (N, None))
    if ids_keep.shape[1] > L:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} tokens but x has only L={L}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("pos_embed", pos_embed, (1, L, D))
    if prefix is not None:
        check_tensor("prefix", prefix, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("prefix", prefix, (1, None, D))
    if check_indices_enabled(check_indices, x.device):
        check_distinct_rows("ids_keep", ids_keep, L)
    return apply(_GatherTokens, "gather_tokens", x, ids_keep, pos_embed, prefix)
