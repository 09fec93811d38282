"""Token movement of MAE in one pass each: visible-token gather, visible-patch gather, decoder unshuffle.

- ``gather_tokens(x, ids_keep, pos_embed=None, prefix=None)``: x [N, L, D] -> [N, P+K, D]: prefix rows
  (e.g. cls_token + pos_embed[:, :1]) then x at ids_keep (+ pos_embed at ids_keep).
- ``gather_patches(imgs, ids_keep, patch_size, *, t_patch_size=1)``: imgs [N, C, H, W] -> [N, K, C*p*p], or
  a video [N, C, T, H, W] -> [N, K, C*u*p*p] (tubelets of u = t_patch_size frames), raw pixels of the
  visible patches in the (C, (u,) p, p) order of ``proj.weight.flatten(1)`` (Conv2d, or Conv3d for video):
  the visible-only patch embedding is ``F.linear(gather_patches(imgs, ids, p), proj.weight.flatten(1),
  proj.bias)``.
- ``unshuffle_tokens(x, ids_restore, mask_token, pos_embed=None, num_prefix=1)``: x [N, P+K, D] ->
  [N, P+L, D]: prefix rows, then kept tokens back in place and mask_token elsewhere (+ pos_embed).

Each is a ``torch.library.triton_op`` (torch.compile sees the Triton kernels) with autograd through every
tensor input; CUDA runs kernels/*.py, CPU runs the plain torch path (``_*_torch``, also the test oracle),
or the kernels through the interpreter under ``TRITON_INTERPRET=1``.

Contracts: ids are int32/int64 on the inputs' device; ids_keep rows hold distinct entries in [0, L) and
ids_restore rows are permutations of [0, L) (as the masking engine makes them). Set
``MAE_FAST_CHECK_INDICES=1`` (or ``check_indices=True``) to verify that (costs a device sync).
Outputs have x's (imgs') dtype; position and mask-token adds are done in fp32 and rounded once.
Gradients of pos_embed / prefix / mask_token are summed in fp32 in a fixed order (deterministic).
Strided inputs are read in place (no copy); outputs are contiguous.
"""

from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import gather_patches as _kp
from mae_fast.kernels import gather_tokens as _kg
from mae_fast.kernels import unshuffle_tokens as _ku

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_clip_grid,
    check_index_range,
    check_indices_enabled,
    check_shape,
    check_tensor,
    use_triton,
)

__all__ = ["gather_tokens", "gather_patches", "unshuffle_tokens"]

_EMPTY = (0,)


def _wrap(kernel):
    return torch.library.wrap_triton(kernel)


def _empty32(like: Tensor) -> Tensor:
    """The placeholder for a gradient that is not needed (a fresh tensor each time: outputs never alias)."""
    return torch.empty(_EMPTY, dtype=torch.float32, device=like.device)


def _dummy(like: Tensor) -> Tensor:
    """A 1-element stand-in for a pointer argument a kernel variant never touches (no empty/null pointers)."""
    return torch.empty((1,), dtype=like.dtype, device=like.device)


def _strides3(t: Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _inverse(ids: Tensor, L: int) -> Tensor:
    """ids [N, K] (distinct entries per row) -> inv [N, L] int32: inv[n, ids[n, k]] = k, -1 elsewhere."""
    N, K = ids.shape
    inv = torch.full((N, L), -1, dtype=torch.int32, device=ids.device)  # [N, L]
    src = torch.arange(K, dtype=torch.int32, device=ids.device).expand(N, K)  # [N, K]
    return inv.scatter_(1, ids.long(), src)


# =========================================================================== gather_tokens
def _gather_tokens_torch(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor], prefix: Optional[Tensor]) -> Tensor:
    """Plain torch forward (CPU path and oracle)."""
    N, L, D = x.shape
    idx = ids_keep.long()  # [N, K]
    out = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D))  # [N, K, D]
    if pos_embed is not None:
        pos = pos_embed[0].float()[idx]  # [N, K, D]
        out = (out.float() + pos).to(x.dtype)
    if prefix is not None:
        out = torch.cat([prefix.to(x.dtype).expand(N, -1, -1), out], dim=1)  # [N, P+K, D]
    return out.contiguous()


def _gather_tokens_bwd_torch(grad: Tensor, ids_keep: Tensor, L: int, P: int, need_x: bool, need_pos: bool,
                             need_prefix: bool):
    N, T, D = grad.shape
    gk = grad[:, P:]  # [N, K, D]
    gx = torch.zeros(N, L, D, dtype=grad.dtype, device=grad.device)
    gx.scatter_(1, ids_keep.long().unsqueeze(-1).expand(-1, -1, D), gk)  # [N, L, D]
    gpos = gx.float().sum(0, keepdim=True) if need_pos else _empty32(grad)
    gpre = (grad[:, :P].float().sum(0, keepdim=True) if need_prefix
            else _empty32(grad))
    if not need_x:
        gx = grad.new_empty(_EMPTY)
    return gx, gpos, gpre


@torch.library.triton_op("mae_fast::gather_tokens", mutates_args=())
def _gather_tokens_op(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor], prefix: Optional[Tensor]) -> Tensor:
    if not use_triton(x):
        return _gather_tokens_torch(x, ids_keep, pos_embed, prefix)
    N, L, D = x.shape
    K = ids_keep.shape[1]
    P = 0 if prefix is None else prefix.shape[1]
    T = P + K
    out = torch.empty((N, T, D), dtype=x.dtype, device=x.device)  # [N, P+K, D]
    if out.numel() == 0:
        return out
    block_r, block_d, warps = _kg.fwd_blocks(D)
    pos = pos_embed if pos_embed is not None else x
    pre = prefix if prefix is not None else x
    grid = (triton_cdiv(N * T, block_r), triton_cdiv(D, block_d))
    _wrap(_kg.gather_tokens_fwd_kernel)[grid](
        x, ids_keep, pos, pre, out,
        N * T, T, P, D,
        *_strides3(x),
        ids_keep.stride(0), ids_keep.stride(1),
        pos.stride(1), pos.stride(2),
        pre.stride(1), pre.stride(2),
        HAS_POS=pos_embed is not None, HAS_PREFIX=prefix is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


@torch.library.triton_op("mae_fast::gather_tokens_backward", mutates_args=())
def _gather_tokens_bwd_op(grad: Tensor, ids_keep: Tensor, L: int, P: int, need_x: bool, need_pos: bool,
                          need_prefix: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_x [N, L, D] in grad's dtype, grad_pos [1, L, D] fp32, grad_prefix [1, P, D] fp32);
    a grad that is not needed comes back as an empty tensor."""
    if not use_triton(grad):
        return _gather_tokens_bwd_torch(grad, ids_keep, L, P, need_x, need_pos, need_prefix)
    N, T, D = grad.shape
    gx = torch.empty((N, L, D) if need_x else _EMPTY, dtype=grad.dtype, device=grad.device)
    if N == 0 or D == 0 or not (need_x or need_pos or need_prefix):
        gpos = torch.zeros((1, L, D), dtype=torch.float32, device=grad.device) if need_pos else _empty32(grad)
        gpre = torch.zeros((1, P, D), dtype=torch.float32, device=grad.device) if need_prefix else _empty32(grad)
        if need_x:
            gx.zero_()
        return gx, gpos, gpre
    inv = _inverse(ids_keep, L)  # [N, L]
    block_n, block_d, splits, chunk, warps = _kg.bwd_blocks(N, P + L, D)
    need_part = need_pos or need_prefix
    part = torch.empty((splits, P + L, D) if need_part else (1,), dtype=torch.float32, device=grad.device)
    grid = (P + L, triton_cdiv(D, block_d), splits)
    _wrap(_kg.gather_tokens_bwd_kernel)[grid](
        grad, inv, gx if need_x else _dummy(grad), part,
        N, L, P, D, chunk,
        *_strides3(grad),
        NEED_X=need_x, NEED_POS=need_pos, NEED_PREFIX=need_prefix,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    gpos = part[:, P:].sum(0, keepdim=True) if need_pos else _empty32(grad)  # [1, L, D]
    gpre = part[:, :P].sum(0, keepdim=True) if need_prefix else _empty32(grad)  # [1, P, D]
    return gx, gpos, gpre


def _gather_tokens_setup(ctx, inputs, output):
    x, ids_keep, pos_embed, prefix = inputs
    ctx.save_for_backward(ids_keep)
    ctx.L = x.shape[1]
    ctx.P = 0 if prefix is None else prefix.shape[1]
    ctx.x_dtype = x.dtype
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype
    ctx.prefix_dtype = None if prefix is None else prefix.dtype


def _gather_tokens_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    need_x, _, need_pos, need_prefix = ctx.needs_input_grad
    need_pos = bool(need_pos and ctx.pos_dtype is not None)
    need_prefix = bool(need_prefix and ctx.prefix_dtype is not None)
    gx, gpos, gpre = torch.ops.mae_fast.gather_tokens_backward(
        grad, ids_keep, ctx.L, ctx.P, bool(need_x), need_pos, need_prefix)
    return (
        gx.to(ctx.x_dtype) if need_x else None,
        None,
        gpos.to(ctx.pos_dtype) if need_pos else None,
        gpre.to(ctx.prefix_dtype) if need_prefix else None,
    )


torch.library.register_autograd(
    "mae_fast::gather_tokens", _gather_tokens_backward, setup_context=_gather_tokens_setup)


def gather_tokens(x: Tensor, ids_keep: Tensor, pos_embed: Optional[Tensor] = None, prefix: Optional[Tensor] = None,
                  *, check_indices: Optional[bool] = None) -> Tensor:
    """Visible tokens, optionally with their position added and prefix rows prepended.

    x [N, L, D], ids_keep [N, K] (int32/int64), pos_embed [1, L, D], prefix [1, P, D] -> [N, P+K, D]:
    out[n, :P] = prefix[0]; out[n, P+k] = x[n, ids_keep[n, k]] (+ pos_embed[0, ids_keep[n, k]]).
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
    if check_indices_enabled(check_indices):
        _check_distinct("ids_keep", ids_keep, L)
    return torch.ops.mae_fast.gather_tokens(x, ids_keep, pos_embed, prefix)


# =========================================================================== gather_patches
def _as_video(imgs: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, C, 1, H, W] (a view); [N, C, T, H, W] as is."""
    return imgs.unsqueeze(2) if imgs.dim() == 4 else imgs


def _gather_patches_torch(imgs: Tensor, ids_keep: Tensor, patch_size: int, t_patch_size: int = 1) -> Tensor:
    """Plain torch forward (CPU path and oracle): [N, C, (T,) H, W] -> [N, K, C*u*p*p] in (C, u, p, p) order."""
    v = _as_video(imgs)  # [N, C, T, H, W]
    N, C, T, H, W = v.shape
    p, u = patch_size, t_patch_size
    h, w = H // p, W // p
    E = C * u * p * p
    x = v.reshape(N, C, T // u, u, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7)  # [N, T', h, w, C, u, p, p]
    x = x.reshape(N, (T // u) * h * w, E)  # [N, L, C*u*p*p]
    return torch.gather(x, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, E))  # [N, K, C*u*p*p]


def _gather_patches_bwd_torch(grad: Tensor, ids_keep: Tensor, C: int, T: int, H: int, W: int, patch_size: int,
                              t_patch_size: int) -> Tensor:
    """-> grad_imgs [N, C, T, H, W] (T = 1 for an image), contiguous."""
    N, K, E = grad.shape
    p, u = patch_size, t_patch_size
    h, w = H // p, W // p
    gx = torch.zeros(N, (T // u) * h * w, E, dtype=grad.dtype, device=grad.device)
    gx.scatter_(1, ids_keep.long().unsqueeze(-1).expand(-1, -1, E), grad)  # [N, L, C*u*p*p]
    gx = gx.reshape(N, T // u, h, w, C, u, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # [N, C, T', u, h, p, w, p]
    return gx.reshape(N, C, T, H, W).contiguous()


@torch.library.triton_op("mae_fast::gather_patches", mutates_args=())
def _gather_patches_op(imgs: Tensor, ids_keep: Tensor, patch_size: int, t_patch_size: int = 1) -> Tensor:
    if not use_triton(imgs):
        return _gather_patches_torch(imgs, ids_keep, patch_size, t_patch_size)
    N, C = imgs.shape[0], imgs.shape[1]
    H, W = imgs.shape[-2], imgs.shape[-1]
    sit = imgs.stride(2) if imgs.dim() == 5 else 0  # an image has one frame: its time stride is never used
    p, u = patch_size, t_patch_size
    K = ids_keep.shape[1]
    E = C * u * p * p
    out = torch.empty((N, K, E), dtype=imgs.dtype, device=imgs.device)  # [N, K, C*u*p*p]
    if out.numel() == 0:
        return out
    block_r, block_e, warps = _kp.blocks(E)
    grid = (triton_cdiv(N * K, block_r), triton_cdiv(E, block_e))
    _wrap(_kp.gather_patches_fwd_kernel)[grid](
        imgs, ids_keep, out,
        N * K, K, E, W // p, (H // p) * (W // p),
        imgs.stride(0), imgs.stride(1), sit, imgs.stride(-2), imgs.stride(-1),
        ids_keep.stride(0), ids_keep.stride(1),
        PATCH=p, TUBE=u, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return out


@torch.library.triton_op("mae_fast::gather_patches_backward", mutates_args=())
def _gather_patches_bwd_op(grad: Tensor, ids_keep: Tensor, C: int, T: int, H: int, W: int, patch_size: int,
                           t_patch_size: int) -> Tensor:
    """-> grad_imgs [N, C, T, H, W] in grad's dtype (T = 1 for an image)."""
    if not use_triton(grad):
        return _gather_patches_bwd_torch(grad, ids_keep, C, T, H, W, patch_size, t_patch_size)
    N, K, E = grad.shape
    p, u = patch_size, t_patch_size
    L = (T // u) * (H // p) * (W // p)
    gi = torch.empty((N, C, T, H, W), dtype=grad.dtype, device=grad.device)  # [N, C, T, H, W]
    if gi.numel() == 0:
        return gi
    inv = _inverse(ids_keep, L)  # [N, L]
    block_r, block_e, warps = _kp.blocks(E)
    grid = (triton_cdiv(N * L, block_r), triton_cdiv(E, block_e))
    _wrap(_kp.gather_patches_bwd_kernel)[grid](
        grad, inv, gi,
        N * L, L, E, W // p, (H // p) * (W // p), T, H, W,
        *_strides3(grad),
        PATCH=p, TUBE=u, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return gi


def _gather_patches_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, t_patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.shape = tuple(imgs.shape)
    ctx.dtype = imgs.dtype
    ctx.patch_size = patch_size
    ctx.t_patch_size = t_patch_size


def _gather_patches_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    C, H, W = ctx.shape[1], ctx.shape[-2], ctx.shape[-1]
    T = ctx.shape[2] if len(ctx.shape) == 5 else 1
    gi = torch.ops.mae_fast.gather_patches_backward(grad, ids_keep, C, T, H, W, ctx.patch_size, ctx.t_patch_size)
    return gi.reshape(ctx.shape).to(ctx.dtype), None, None, None  # [N, C, (T,) H, W]


torch.library.register_autograd(
    "mae_fast::gather_patches", _gather_patches_backward, setup_context=_gather_patches_setup)


def gather_patches(imgs: Tensor, ids_keep: Tensor, patch_size: int, *, t_patch_size: int = 1,
                   check_indices: Optional[bool] = None) -> Tensor:
    """Raw pixels of the visible patches (tubelets): imgs [N, C, H, W] or [N, C, T, H, W], ids_keep [N, K]
    -> [N, K, C*u*p*p] (u = t_patch_size; 1, the only value allowed, for 4-D imgs).

    Token l is (s, r, c) = (l // (h*w), (l % (h*w)) // w, l % w) with h = H/p, w = W/p (s = 0 for an
    image: the row-major patch grid); L = (T/u) * h * w. The vector is in (C, u, p, p) order, the order of
    ``patch_embed.proj.weight.flatten(1)`` of a Conv2d (image) or Conv3d (video, kernel (u, p, p)), not
    the order of ``reference.patchify``.
    """
    N, _, _, _, _, L = check_clip_grid(imgs, patch_size, t_patch_size)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=imgs.device)
    check_shape("ids_keep", ids_keep, (N, None))
    if ids_keep.shape[1] > L:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} patches but imgs has only L={L}")
    if check_indices_enabled(check_indices):
        _check_distinct("ids_keep", ids_keep, L)
    return torch.ops.mae_fast.gather_patches(imgs, ids_keep, patch_size, t_patch_size)


# =========================================================================== unshuffle_tokens
def _unshuffle_torch(x: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor],
                     num_prefix: int) -> Tensor:
    """Plain torch forward (CPU path and oracle)."""
    N, T, D = x.shape
    P = num_prefix
    L = ids_restore.shape[1]
    K = T - P
    xw = x if pos_embed is None else x.float()  # with a position add, work in fp32 and round once
    mt = mask_token.to(xw.dtype).expand(N, L - K, D)  # [N, L-K, D]
    xs = torch.cat([xw[:, P:], mt], dim=1)  # [N, L, D]
    xs = torch.gather(xs, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, D))  # [N, L, D]
    out = torch.cat([xw[:, :P], xs], dim=1)  # [N, P+L, D]
    if pos_embed is not None:
        out = out + pos_embed.float()
    return out.to(x.dtype).contiguous()


def _unshuffle_bwd_torch(grad: Tensor, ids_restore: Tensor, K: int, P: int, need_x: bool, need_pos: bool,
                         need_mask: bool):
    N, T, D = grad.shape  # T = P + L
    idx = ids_restore.long()  # [N, L]
    gpos = grad.float().sum(0, keepdim=True) if need_pos else _empty32(grad)  # [1, P+L, D]
    gt = grad[:, P:]  # [N, L, D]
    removed = (idx >= K).unsqueeze(-1)  # [N, L, 1]
    gmask = (gt.float() * removed).sum((0, 1)).reshape(1, 1, D) if need_mask else _empty32(grad)
    if need_x:
        gx = torch.zeros(N, P + K, D, dtype=grad.dtype, device=grad.device)
        gx[:, :P] = grad[:, :P]
        ids_keep = torch.argsort(idx, dim=1)[:, :K]  # [N, K] position of kept token k
        gx[:, P:] = torch.gather(gt, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    else:
        gx = grad.new_empty(_EMPTY)
    return gx, gpos, gmask


@torch.library.triton_op("mae_fast::unshuffle_tokens", mutates_args=())
def _unshuffle_op(x: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor],
                  num_prefix: int) -> Tensor:
    if not use_triton(x):
        return _unshuffle_torch(x, ids_restore, mask_token, pos_embed, num_prefix)
    N, T_in, D = x.shape
    P = num_prefix
    K = T_in - P
    L = ids_restore.shape[1]
    T = P + L
    out = torch.empty((N, T, D), dtype=x.dtype, device=x.device)  # [N, P+L, D]
    if out.numel() == 0:
        return out
    block_r, block_d, warps = _kg.fwd_blocks(D)
    pos = pos_embed if pos_embed is not None else x
    grid = (triton_cdiv(N * T, block_r), triton_cdiv(D, block_d))
    _wrap(_ku.unshuffle_fwd_kernel)[grid](
        x, ids_restore, mask_token, pos, out,
        N * T, T, P, K, D,
        *_strides3(x),
        ids_restore.stride(0), ids_restore.stride(1),
        mask_token.stride(2),
        pos.stride(1), pos.stride(2),
        HAS_POS=pos_embed is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return out


@torch.library.triton_op("mae_fast::unshuffle_tokens_backward", mutates_args=())
def _unshuffle_bwd_op(grad: Tensor, ids_restore: Tensor, K: int, P: int, need_x: bool, need_pos: bool,
                      need_mask: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_x [N, P+K, D] in grad's dtype, grad_pos [1, P+L, D] fp32, grad_mask [1, 1, D] fp32);
    a grad that is not needed comes back as an empty tensor."""
    if not use_triton(grad):
        return _unshuffle_bwd_torch(grad, ids_restore, K, P, need_x, need_pos, need_mask)
    N, T, D = grad.shape
    L = T - P
    gx = torch.empty((N, P + K, D) if need_x else _EMPTY, dtype=grad.dtype, device=grad.device)
    if N == 0 or D == 0 or not (need_x or need_pos or need_mask):
        gpos = torch.zeros((1, T, D), dtype=torch.float32, device=grad.device) if need_pos else _empty32(grad)
        gmask = torch.zeros((1, 1, D), dtype=torch.float32, device=grad.device) if need_mask else _empty32(grad)
        if need_x:
            gx.zero_()
        return gx, gpos, gmask
    block_n, block_d, splits, chunk, warps = _kg.bwd_blocks(N, T, D)
    ppos = torch.empty((splits, T, D) if need_pos else (1,), dtype=torch.float32, device=grad.device)
    pmask = torch.empty((splits, L, D) if need_mask else (1,), dtype=torch.float32, device=grad.device)
    grid = (T, triton_cdiv(D, block_d), splits)
    _wrap(_ku.unshuffle_bwd_kernel)[grid](
        grad, ids_restore, gx if need_x else _dummy(grad), ppos, pmask,
        N, L, P, K, D, chunk,
        *_strides3(grad),
        ids_restore.stride(0), ids_restore.stride(1),
        NEED_X=need_x, NEED_POS=need_pos, NEED_MASK=need_mask,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    gpos = ppos.sum(0, keepdim=True) if need_pos else _empty32(grad)  # [1, P+L, D]
    gmask = pmask.sum((0, 1)).reshape(1, 1, D) if need_mask else _empty32(grad)  # [1, 1, D]
    return gx, gpos, gmask


def _unshuffle_setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed, num_prefix = inputs
    ctx.save_for_backward(ids_restore)
    ctx.P = num_prefix
    ctx.K = x.shape[1] - num_prefix
    ctx.x_dtype = x.dtype
    ctx.mask_dtype = mask_token.dtype
    ctx.mask_shape = tuple(mask_token.shape)
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _unshuffle_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_x, _, need_mask, need_pos, _ = ctx.needs_input_grad
    need_pos = bool(need_pos and ctx.pos_dtype is not None)
    gx, gpos, gmask = torch.ops.mae_fast.unshuffle_tokens_backward(
        grad, ids_restore, ctx.K, ctx.P, bool(need_x), need_pos, bool(need_mask))
    return (
        gx.to(ctx.x_dtype) if need_x else None,
        None,
        gmask.to(ctx.mask_dtype).reshape(ctx.mask_shape) if need_mask else None,
        gpos.to(ctx.pos_dtype) if need_pos else None,
        None,
    )


torch.library.register_autograd(
    "mae_fast::unshuffle_tokens", _unshuffle_backward, setup_context=_unshuffle_setup)


def unshuffle_tokens(x: Tensor, ids_restore: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor] = None,
                     num_prefix: int = 1, *, check_indices: Optional[bool] = None) -> Tensor:
    """Decoder input: x [N, P+K, D] (prefix rows first), ids_restore [N, L], mask_token [1, 1, D] (or [D]),
    pos_embed [1, P+L, D] -> [N, P+L, D]. Row P+l is x[n, P+ids_restore[n, l]] if that is < K, else the
    mask token; pos_embed is added to every row.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    N, T_in, D = x.shape
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix <= T_in:
        raise ValueError(f"num_prefix must be an int in [0, {T_in}] (x has {T_in} rows), got {num_prefix!r}")
    P = num_prefix
    K = T_in - P
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    check_shape("ids_restore", ids_restore, (N, None))
    L = ids_restore.shape[1]
    if K > L:
        raise ValueError(f"x has K={K} kept tokens (after {P} prefix rows) but ids_restore has only L={L}")
    check_tensor("mask_token", mask_token, dtypes=FLOAT_DTYPES, device=x.device)
    if mask_token.numel() != D or mask_token.shape[-1] != D:
        raise ValueError(f"mask_token must have shape [1, 1, {D}] (width D={D} of x), got {list(mask_token.shape)}")
    if mask_token.dim() != 3:
        mask_token = mask_token.reshape(1, 1, D)
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("pos_embed", pos_embed, (1, P + L, D))
    if check_indices_enabled(check_indices):
        check_index_range("ids_restore", ids_restore, L)
        srt = torch.sort(ids_restore.long(), dim=1).values  # [N, L]
        if not torch.equal(srt, torch.arange(L, device=srt.device).expand(N, L)):
            raise ValueError("ids_restore rows must be permutations of [0, L)")
    return torch.ops.mae_fast.unshuffle_tokens(x, ids_restore, mask_token, pos_embed, P)


# =========================================================================== helpers
def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_distinct(name: str, ids: Tensor, upper: int) -> None:
    check_index_range(name, ids, upper)
    srt = torch.sort(ids.long(), dim=1).values  # [N, K]
    if srt.shape[1] > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError(f"{name} rows must hold distinct indices (a repeated index was found)")
