"""unshuffle_tokens: the decoder input in one pass: kept tokens back in place, mask tokens elsewhere, positions.

x [N, P+K, D] (P prefix rows first), ids_restore [N, L] -> [N, P+L, D]: row P+l is x[n, P+ids_restore[n, l]]
where that is < K, else mask_token; pos_embed [1, P+L, D] is added to every row. Kernels:
``kernels/unshuffle_tokens.py``; plain torch path: :func:`unshuffle_tokens_torch`. Any ids_restore is safe
(``_indices.py``): an r outside [0, L) gives a NaN row; a row that is no permutation gets torch.gather's
gradient (summed where an r repeats, zero for an r never named).
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import unshuffle_tokens as _k

from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_indices_enabled, check_int, check_permutation_rows, check_shape,
                      check_tensor)
from ._indices import poison_rows, valid_and_clamped
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import no_grad_placeholder, unused_pointer, wide
from ._triton import launch
from .paths import use_triton

__all__ = ["unshuffle_tokens", "unshuffle_tokens_torch", "unshuffle_tokens_backward_torch"]


def unshuffle_tokens_torch(x: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor],
                           num_prefix: int, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Plain torch forward (the CPU path and the oracle); with positions, fp32 math and one rounding."""
    N, T, D = x.shape
    P, L = num_prefix, ids_restore.shape[1]
    K = T - P
    out_dtype = out_dtype or x.dtype
    xw = x if pos_embed is None and out_dtype == x.dtype else wide(x)
    xs = torch.cat([xw[:, P:], mask_token.to(xw.dtype).expand(N, L - K, D)], dim=1)  # [N, L, D]
    valid, idx, all_valid = valid_and_clamped(ids_restore, L)  # [N, L]
    xs = torch.gather(xs, 1, idx.unsqueeze(-1).expand(-1, -1, D))  # [N, L, D]
    out = torch.cat([xw[:, :P], xs], dim=1)  # [N, P+L, D]
    if pos_embed is not None:
        out = out + wide(pos_embed)
    out = out.to(out_dtype).contiguous()
    poison_rows(out[:, P:], valid, all_valid)  # in place on out's token rows
    return out


def unshuffle_tokens_backward_torch(grad: Tensor, ids_restore: Tensor, K: int, P: int, need_x: bool, need_pos: bool,
                                    need_mask: bool, x_dtype: Optional[torch.dtype] = None):
    """(grad_x [N, P+K, D] in x_dtype (default grad's), grad_pos [1, P+L, D] fp32, grad_mask [1, 1, D] fp32);
    unneeded ones empty."""
    N, T, D = grad.shape
    L = T - P
    valid, idx, all_valid = valid_and_clamped(ids_restore, L)  # [N, L]
    g = wide(grad)  # [N, P+L, D] (fp32, float64 for float64)
    if not all_valid:  # a NaN row (r outside [0, L)) fed no input
        g = torch.cat([g[:, :P], g[:, P:].masked_fill(~valid.unsqueeze(-1), 0.0)], dim=1)
    gpos = g.sum(0, keepdim=True) if need_pos else no_grad_placeholder(grad)  # [1, P+L, D]
    # torch.gather's gradient: row r of [x tokens; mask tokens] gets the sum of the rows l naming it
    gsrc = torch.zeros(N, L, D, dtype=g.dtype, device=grad.device)
    gsrc.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, D), g[:, P:])  # [N, L, D]
    gmask = gsrc[:, K:].sum((0, 1)).reshape(1, 1, D) if need_mask else no_grad_placeholder(grad)
    if not need_x:
        return grad.new_empty((0,)), gpos, gmask
    gx = torch.cat([g[:, :P], gsrc[:, :K]], dim=1).to(x_dtype or grad.dtype)  # [N, P+K, D]
    return gx, gpos, gmask


@register_op("unshuffle_tokens")
def _forward(x: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor],
             num_prefix: int, out_dtype: torch.dtype) -> Tensor:
    if not use_triton(x):
        return unshuffle_tokens_torch(x, ids_restore, mask_token, pos_embed, num_prefix, out_dtype)
    N, T_in, D = x.shape
    P, L = num_prefix, ids_restore.shape[1]
    T = P + L
    out = torch.empty((N, T, D), dtype=out_dtype, device=x.device)  # [N, P+L, D]
    if out.numel() == 0:
        return out
    cfg = _launch.row_copy(D)
    pos = pos_embed if pos_embed is not None else x
    launch(_k.unshuffle_tokens_fwd_kernel)[(triton.cdiv(N * T, cfg.block_rows), triton.cdiv(D, cfg.block_cols))](
        x, ids_restore, mask_token, pos, out,
        N * T, T, P, T_in - P, D, L,
        x.stride(0), x.stride(1), x.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        mask_token.stride(2),
        pos.stride(1), pos.stride(2),
        HAS_POS=pos_embed is not None, BLOCK_R=cfg.block_rows, BLOCK_D=cfg.block_cols, num_warps=cfg.num_warps,
    )
    return out


@register_op("unshuffle_tokens_backward")
def _backward(grad: Tensor, ids_restore: Tensor, K: int, P: int, need_x: bool, need_pos: bool,
              need_mask: bool, x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    if not use_triton(grad):
        return unshuffle_tokens_backward_torch(grad, ids_restore, K, P, need_x, need_pos, need_mask, x_dtype)
    N, T, D = grad.shape
    L = T - P
    gx = torch.empty((N, P + K, D) if need_x else (0,), dtype=x_dtype, device=grad.device)
    if N == 0 or D == 0 or T == 0:  # nothing to launch over
        gpos = torch.zeros((1, T, D), dtype=torch.float32, device=grad.device) if need_pos else no_grad_placeholder(grad)
        gmask = torch.zeros((1, 1, D), dtype=torch.float32, device=grad.device) if need_mask else no_grad_placeholder(grad)
        return gx.zero_(), gpos, gmask
    cfg = _launch.column_split(N, T, D)
    ppos = torch.empty((cfg.splits, T, D) if need_pos else (1,), dtype=torch.float32, device=grad.device)
    pmask = torch.empty((cfg.splits, L, D) if need_mask else (1,), dtype=torch.float32, device=grad.device)
    launch(_k.unshuffle_tokens_bwd_kernel)[(T, triton.cdiv(D, cfg.block_d), cfg.splits)](
        grad, ids_restore, gx if need_x else unused_pointer(grad), ppos, pmask,
        N, L, P, K, D, cfg.chunk_n,
        grad.stride(0), grad.stride(1), grad.stride(2),
        ids_restore.stride(0), ids_restore.stride(1),
        NEED_X=need_x, NEED_POS=need_pos, NEED_MASK=need_mask,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )
    if need_x and L:  # rows of ids_restore that are no permutation: their grad_x rewritten (a map per sample otherwise)
        code = torch.empty((N, L), dtype=torch.int32, device=grad.device)  # [N, L] scratch
        nxt = torch.empty((N, L), dtype=torch.int32, device=grad.device)  # [N, L] scratch
        launch(_k.unshuffle_tokens_fix_kernel)[(N,)](
            ids_restore, code, nxt, grad, gx,
            L, P, K, D,
            grad.stride(0), grad.stride(1), grad.stride(2),
            ids_restore.stride(0), ids_restore.stride(1),
            BLOCK_K=min(1024, triton.next_power_of_2(L)), BLOCK_L=min(1024, triton.next_power_of_2(L)),
            BLOCK_C=min(64, triton.next_power_of_2(L)), BLOCK_R=16, BLOCK_D=min(256, triton.next_power_of_2(D)),
            num_warps=4,
        )
    gpos = ppos.sum(0, keepdim=True) if need_pos else no_grad_placeholder(grad)  # [1, P+L, D]
    gmask = pmask.sum((0, 1)).reshape(1, 1, D) if need_mask else no_grad_placeholder(grad)  # [1, 1, D]
    return gx, gpos, gmask


class _UnshuffleTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids_restore, mask_token, pos_embed, num_prefix, out_dtype):
        a = anchor(x)
        ctx.save_for_backward(ids_restore, a)
        ctx.P, ctx.K = num_prefix, x.shape[1] - num_prefix
        ctx.dtypes = (x.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
        ctx.mask_shape = tuple(mask_token.shape)
        return _forward(x, ids_restore, mask_token.reshape(1, 1, -1), pos_embed, num_prefix, out_dtype), a

    @staticmethod
    @once_differentiable("unshuffle_tokens")
    def backward(ctx, grad):
        ids_restore, _ = ctx.saved_tensors
        x_dtype, mask_dtype, pos_dtype = ctx.dtypes
        need_x, _, need_mask, need_pos, _, _ = ctx.needs_input_grad
        need_pos = need_pos and pos_dtype is not None
        gx, gpos, gmask = _backward(grad, ids_restore, ctx.K, ctx.P, need_x, need_pos, need_mask, x_dtype)
        return (gx if need_x else None, None,
                gmask.to(mask_dtype).reshape(ctx.mask_shape) if need_mask else None,
                gpos.to(pos_dtype) if need_pos else None, None, None)


def unshuffle_tokens(x: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor] = None,
                     num_prefix: int = 1, *, out_dtype: Optional[torch.dtype] = None,
                     check_indices: Optional[bool] = None) -> Tensor:
    """Decoder input: x [N, P+K, D] (prefix rows first), ids_restore [N, L] (permutations of [0, L)),
    mask_token [1, 1, D] (or [D]), pos_embed [1, P+L, D] -> [N, P+L, D] in ``out_dtype`` (default x's; the
    official code's cat with an fp32 mask token gives fp32 under autocast); autograd to x, mask_token and
    pos_embed. The mask-token and position adds are done in fp32 and rounded once.

    ``check_indices`` (default: on for CPU tensors, else ``MAE_FAST_CHECK_INDICES``): a ValueError unless
    every row of ids_restore is a permutation of [0, L) (a device sync on CUDA). Unchecked, an r outside
    [0, L) gives a NaN row, and any row gets torch.gather's gradient, on every path.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    N, T_in, D = x.shape
    what = f"an int in [0, {T_in}] (x has {T_in} rows)"
    P = check_int("num_prefix", num_prefix, 0, what=what)
    if P > T_in:
        raise ValueError(f"num_prefix must be {what}, got {P}")
    K = T_in - P
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    check_shape("ids_restore", ids_restore, (N, None))
    L = ids_restore.shape[1]
    if K > L:
        raise ValueError(f"x has K={K} kept tokens (after {P} prefix rows) but ids_restore has only L={L}")
    check_tensor("mask_token", mask_token, dtypes=FLOAT_DTYPES, device=x.device)
    if mask_token.dim() == 0 or mask_token.numel() != D or mask_token.shape[-1] != D:
        raise ValueError(f"mask_token must have shape [1, 1, {D}] (width D={D} of x), got {list(mask_token.shape)}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("pos_embed", pos_embed, (1, P + L, D))
    if out_dtype is None:
        out_dtype = x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype}")
    if check_indices_enabled(check_indices, x.device):
        check_permutation_rows("ids_restore", ids_restore)
    return apply(_UnshuffleTokens, "unshuffle_tokens", x, ids_restore, mask_token, pos_embed, P, out_dtype)
