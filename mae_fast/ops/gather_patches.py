"""gather_patches: the raw pixels of the visible patches (tubelets), for a patch embedding of those only.

imgs [N, C, H, W] -> [N, K, C*p*p], or a video [N, C, T, H, W] -> [N, K, C*u*p*p] (tubelets of
u = t_patch_size frames), in the (C, (u,) p, p) order of ``proj.weight.flatten(1)`` of a Conv2d (or Conv3d):
``F.linear(gather_patches(imgs, ids, p), proj.weight.flatten(1), proj.bias)`` embeds the kept patches.
Kernels: ``kernels/gather_patches.py``; plain torch path: :func:`gather_patches_torch`. Any ids are safe
(``_indices.py``): one outside [0, L) gives a NaN row, a repeated one the summed gradient.
"""
from typing import Optional

import torch
import triton
from torch import Tensor

from mae_fast.kernels import _launch
from mae_fast.kernels import gather_patches as _k

from ._checks import (INDEX_DTYPES, check_clip_grid, check_distinct_rows, check_indices_enabled, check_patch_sizes,
                      check_shape, check_tensor)
from ._indices import index_map, poison_rows, valid_and_clamped
from ._autograd import anchor, apply, once_differentiable
from ._op import register_op
from ._tensors import wide
from ._triton import launch
from .paths import use_triton

__all__ = ["gather_patches", "gather_patches_torch", "gather_patches_backward_torch"]


def gather_patches_torch(imgs: Tensor, ids_keep: Tensor, patch_size: int, t_patch_size: int = 1) -> Tensor:
    """Plain torch forward (the CPU path and the oracle)."""
    v = imgs.unsqueeze(2) if imgs.dim() == 4 else imgs  # [N, C, T, H, W], T = 1 for an image
    N, C, T, H, W = v.shape
    p, u = patch_size, t_patch_size
    h, w = H // p, W // p
    E = C * u * p * p
    x = v.reshape(N, C, T // u, u, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7)  # [N, T', h, w, C, u, p, p]
    x = x.reshape(N, (T // u) * h * w, E)  # [N, L, C*u*p*p]
    valid, idx, all_valid = valid_and_clamped(ids_keep, x.shape[1])  # [N, K]
    out = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, E))  # [N, K, C*u*p*p], a new tensor
    return poison_rows(out, valid, all_valid)


def gather_patches_backward_torch(grad: Tensor, ids_keep: Tensor, C: int, T: int, H: int, W: int, patch_size: int,
                                  t_patch_size: int) -> Tensor:
    """-> grad_imgs [N, C, T, H, W] (T = 1 for an image), contiguous."""
    N, K, E = grad.shape
    p, u = patch_size, t_patch_size
    h, w = H // p, W // p
    L = (T // u) * h * w
    valid, idx, all_valid = valid_and_clamped(ids_keep, L)  # [N, K]
    g = wide(grad) if all_valid else wide(grad).masked_fill(~valid.unsqueeze(-1), 0.0)  # [N, K, E]
    gx = torch.zeros(N, L, E, dtype=g.dtype, device=grad.device)
    gx.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, E), g)  # [N, L, C*u*p*p]: repeated ids add up
    gx = gx.to(grad.dtype).reshape(N, T // u, h, w, C, u, p, p)
    gx = gx.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [N, C, T', u, h, p, w, p]
    return gx.reshape(N, C, T, H, W).contiguous()


@register_op("gather_patches")
def _forward(imgs: Tensor, ids_keep: Tensor, patch_size: int, t_patch_size: int) -> Tensor:
    if not use_triton(imgs):
        return gather_patches_torch(imgs, ids_keep, patch_size, t_patch_size)
    N, C, H, W = imgs.shape[0], imgs.shape[1], imgs.shape[-2], imgs.shape[-1]
    sit = imgs.stride(2) if imgs.dim() == 5 else 0  # an image is one frame: its time stride is never used
    p, u = patch_size, t_patch_size
    K, E = ids_keep.shape[1], C * u * p * p
    L = (imgs.shape[2] // u if imgs.dim() == 5 else 1) * (H // p) * (W // p)
    out = torch.empty((N, K, E), dtype=imgs.dtype, device=imgs.device)  # [N, K, C*u*p*p]
    if out.numel() == 0:
        return out
    cfg = _launch.row_copy(E)
    launch(_k.gather_patches_fwd_kernel)[(triton.cdiv(N * K, cfg.block_rows), triton.cdiv(E, cfg.block_cols))](
        imgs, ids_keep, out,
        N * K, K, E, W // p, (H // p) * (W // p), L,
        imgs.stride(0), imgs.stride(1), sit, imgs.stride(-2), imgs.stride(-1),
        ids_keep.stride(0), ids_keep.stride(1),
        PATCH=p, TUBE=u, BLOCK_R=cfg.block_rows, BLOCK_E=cfg.block_cols, num_warps=cfg.num_warps,
    )
    return out


@register_op("gather_patches_backward")
def _backward(grad: Tensor, ids_keep: Tensor, C: int, T: int, H: int, W: int, patch_size: int,
              t_patch_size: int) -> Tensor:
    if not use_triton(grad):
        return gather_patches_backward_torch(grad, ids_keep, C, T, H, W, patch_size, t_patch_size)
    N, K, E = grad.shape
    p, u = patch_size, t_patch_size
    L = (T // u) * (H // p) * (W // p)
    gi = torch.empty((N, C, T, H, W), dtype=grad.dtype, device=grad.device)  # [N, C, T, H, W]
    if gi.numel() == 0:
        return gi
    cfg = _launch.row_copy(E)
    code, nxt = index_map(ids_keep, L)  # [N, L], [N, K]
    launch(_k.gather_patches_bwd_kernel)[(triton.cdiv(N * L, cfg.block_rows), triton.cdiv(E, cfg.block_cols))](
        grad, code, nxt, gi,
        N * L, L, K, E, W // p, (H // p) * (W // p), T, H, W,
        grad.stride(0), grad.stride(1), grad.stride(2),
        PATCH=p, TUBE=u, BLOCK_R=cfg.block_rows, BLOCK_E=cfg.block_cols, num_warps=cfg.num_warps,
    )
    return gi


class _GatherPatches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, imgs, ids_keep, patch_size, t_patch_size):
        a = anchor(imgs)
        ctx.save_for_backward(ids_keep, a)
        ctx.shape, ctx.dtype, ctx.sizes = tuple(imgs.shape), imgs.dtype, (patch_size, t_patch_size)
        return _forward(imgs, ids_keep, patch_size, t_patch_size), a

    @staticmethod
    @once_differentiable("gather_patches")
    def backward(ctx, grad):
        ids_keep, _ = ctx.saved_tensors
        C, H, W = ctx.shape[1], ctx.shape[-2], ctx.shape[-1]
        T = ctx.shape[2] if len(ctx.shape) == 5 else 1
        gi = _backward(grad, ids_keep, C, T, H, W, *ctx.sizes)
        return gi.reshape(ctx.shape).to(ctx.dtype), None, None, None  # [N, C, (T,) H, W]


def gather_patches(imgs: Tensor, ids_keep: Tensor, patch_size: int, *, t_patch_size: int = 1,
                   check_indices: Optional[bool] = None) -> Tensor:
    """Raw pixels of the visible patches (tubelets): imgs [N, C, H, W] or [N, C, T, H, W], ids_keep [N, K]
    -> [N, K, C*u*p*p] (u = t_patch_size, 1 for 4-D imgs); autograd to imgs.

    Token l is (s, r, c) = (l // (h*w), (l % (h*w)) // w, l % w) with h = H/p, w = W/p (s = 0 for an image);
    the vector is in (C, u, p, p) order (the conv weight's), not the order of ``reference.patchify``.
    ``check_indices`` as :func:`mae_fast.ops.gather_tokens`: unchecked, an id outside [0, L) gives a NaN row
    and a repeated id the summed gradient.
    """
    patch_size, t_patch_size = check_patch_sizes(patch_size, t_patch_size)
    N, _, _, _, _, L = check_clip_grid(imgs, patch_size, t_patch_size)
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, device=imgs.device)
    check_shape("ids_keep", ids_keep, (N, None))
    if ids_keep.shape[1] > L:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} patches but imgs has only L={L}")
    if check_indices_enabled(check_indices, imgs.device):
        check_distinct_rows("ids_keep", ids_keep, L)
    return apply(_GatherPatches, "gather_patches", imgs, ids_keep, patch_size, t_patch_size)
