"""norm_pix_loss: the MAE reconstruction loss read straight from imgs, its gradient computed in the same pass.

Equals the official ``forward_loss`` (:func:`mae_fast.reference.patch_loss`) without building the
patchified target. Two forms: ``pred [N, L, D]`` for every patch with ``mask [N, L]`` weights (loss =
sum(row_loss * mask) / sum(mask)), or ``pred [N, M, D]`` for the removed patches only with
``ids_masked [N, M]`` naming them (loss = sum(row_loss) / (N * M)). Video: ``imgs [N, C, T, H, W]`` with
tubelets of ``t_patch_size`` frames. The forward writes the gradient for grad_output 1 into a pred-sized
buffer; eagerly the one backward scales it in place (nothing moves at grad_output 1) and hands it out, so
a second backward through the same graph raises (docs/OPS.md has the details and the fp16 prescale).
Kernels: ``kernels/norm_pix_loss.py``; plain torch path: :func:`norm_pix_loss_forward_torch`.
"""
from typing import Optional

import torch
from torch import Tensor

from mae_fast.kernels import norm_pix_loss as _k

from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_clip_grid, check_distinct_rows, check_indices_enabled,
                      check_number, check_patch_sizes, check_same_device, check_shape, check_tensor)
from ._indices import valid_and_clamped
from ._autograd import anchor, apply, no_torch_func, once_differentiable
from ._op import register_op
from ._tensors import autocast_off, wide
from ._triton import launch
from .paths import dispatching, use_triton

__all__ = ["norm_pix_loss", "norm_pix_loss_torch", "norm_pix_loss_forward_torch", "norm_pix_loss_forward_triton"]


# ------------------------------------------------------------------------------------------ torch path
def _patch_targets(imgs: Tensor, p: int, u: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """imgs [N, C, H, W] or [N, C, T, H, W] -> targets [N, L, u*p*p*C] in ``dtype``, in patchify order
    (u, p, p, C)."""
    v = imgs.unsqueeze(2) if imgs.dim() == 4 else imgs  # [N, C, T, H, W], T = 1 for an image
    n, c, t, h, w = v.shape
    x = v.to(dtype).reshape(n, c, t // u, u, h // p, p, w // p, p)  # [N, C, T', u, h, p, w, p]
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [N, T', h, w, u, p, p, C]
    return x.reshape(n, (t // u) * (h // p) * (w // p), u * p * p * c)  # [N, L, D]


def _row_scale_torch(g: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' fp16 row scale (``_row_scale``): (s, 1 / s) [N, Lp, 1] fp32 powers of two with each row's
    largest |g| (NaN ignored) times s in [2**14, 2**15); 1 for a row of zeros or with an infinity."""
    amax = torch.where(torch.isnan(g), 0.0, g.abs()).amax(-1, keepdim=True).float()  # [N, Lp, 1]
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2(amax)) for a normal amax
    k = torch.where((amax > 0) & (e < 128), (14 - e).clamp(-126, 126), 0)
    return ((k + 127) << 23).view(torch.float32), ((127 - k) << 23).view(torch.float32)


def _targets_at(t: Tensor, ids: Tensor) -> Tensor:
    """t [N, L, D] -> the rows named by ids [N, M]; NaN rows for ids outside [0, L) (a new tensor)."""
    n, m = ids.shape
    valid, idx, all_valid = valid_and_clamped(ids, t.shape[1])
    out = t.gather(1, idx[:, :, None].expand(n, m, t.shape[-1]))  # [N, M, D]
    return out if all_valid else torch.where(valid[:, :, None], out, float("nan"))


def norm_pix_loss_forward_torch(pred, imgs, weight, ids, p: int, norm_pix: bool, eps: float, u: int = 1,
                                write_grad: bool = True):
    """(loss [], gbuf [N, Lp, D] in pred's dtype (empty without write_grad), unscale: [] or, for an fp16 gbuf,
    one per row [N, Lp, 1]), in fp32 (float64 when pred or imgs is float64).

    Works in place on its own target copy: statistics, normalisation, diff and gradient reuse it.
    """
    with autocast_off(pred):  # fp32 math whatever autocast says, as the kernels
        return _forward_torch(pred, imgs, weight, ids, p, norm_pix, eps, u, write_grad)


def _forward_torch(pred, imgs, weight, ids, p, norm_pix, eps, u, write_grad):
    n, lp, d = pred.shape
    acc = torch.float64 if torch.float64 in (pred.dtype, imgs.dtype) else torch.float32
    t = _patch_targets(imgs, p, u, acc)  # [N, L, D]
    if ids is not None:
        t = _targets_at(t, ids)  # [N, M, D], a new tensor
        w = torch.ones(n, lp, dtype=acc, device=pred.device)  # [N, M]
        den = torch.full((), float(n * lp), dtype=acc, device=pred.device)  # N * M, no reduction
    else:
        w = weight.to(acc)  # [N, L]
        den = w.sum()
    if t._is_view():
        t = t.clone()  # patchify was a view of imgs (one patch per image): never write to the user's tensor
    if norm_pix:
        var, mean = torch.var_mean(t, dim=-1, keepdim=True)  # unbiased, [N, Lp, 1]
        t.sub_(mean).mul_(torch.rsqrt(var + eps))  # normalized target
    diff = t.neg_().add_(pred)  # pred - target, fp32, in the same buffer
    active = w != 0  # [N, Lp]
    row = torch.linalg.vecdot(diff, diff) / d  # [N, Lp]
    loss = torch.where(active, row * w, 0.0).sum() / den
    unscale = torch.ones((), dtype=acc, device=pred.device)
    if not write_grad:
        return loss, pred.new_empty((0,)), unscale
    grad1 = diff.mul_((w * (2.0 / d) / den)[:, :, None])  # 2 * w * diff / (D * den)
    if ids is None:  # rows with w == 0: w / den (0, or NaN where den == 0), whatever pred/imgs hold there
        grad1.masked_fill_(~active[:, :, None], torch.zeros((), device=den.device) / den)
    if pred.dtype == torch.float16:
        s, unscale = _row_scale_torch(grad1)
        grad1.mul_(s)
    return loss, grad1.to(pred.dtype), unscale


def _loss_autograd(pred, imgs, weight, ids, p, norm_pix, eps, u):
    """The same loss by autograd through the plain formula: the path when imgs needs a gradient (the
    reference differentiates through the normalised target). Rows with weight 0 are not used, as in the
    kernels; ids outside [0, L) give NaN rows, repeated ids add their gradients into imgs."""
    with autocast_off(pred):  # fp32 math whatever autocast says, as the kernels
        acc = torch.float64 if torch.float64 in (pred.dtype, imgs.dtype) else torch.float32
        t = _patch_targets(imgs, p, u, acc)  # [N, L, D], differentiable
        if ids is not None:
            t = _targets_at(t, ids)  # [N, M, D]
            w = torch.ones(ids.shape, dtype=acc, device=pred.device)
            den = float(ids.numel())
        else:
            w = weight.to(acc)
            den = w.sum()
        active = (w != 0)[:, :, None]  # [N, Lp, 1]
        t = torch.where(active, t, 0.0)  # an unused patch is not read (no NaN from it reaches a gradient)
        if norm_pix:
            var, mean = torch.var_mean(t, dim=-1, keepdim=True)  # unbiased
            t = (t - mean) * torch.rsqrt(var + eps)
        diff = torch.where(active, pred.to(acc) - t, 0.0)
        row = (diff * diff).mean(-1)  # [N, Lp]
        return (row * w).sum() / den


def norm_pix_loss_torch(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6, ids_masked=None, *, t_patch_size=1):
    """The plain torch formula (fp32 statistics), no autograd: the loss only."""
    weight = None if ids_masked is not None else mask
    return norm_pix_loss_forward_torch(pred, imgs, weight, ids_masked, patch_size, norm_pix, eps, t_patch_size,
                                       write_grad=False)[0]


# ------------------------------------------------------------------------------------------ Triton launches
def norm_pix_loss_forward_triton(pred, imgs, weight, ids, p: int, norm_pix: bool, eps: float, u: int = 1,
                                 write_grad: bool = True, configs: Optional[dict] = None):
    """The forward kernels: same outputs as :func:`norm_pix_loss_forward_torch`. ``configs`` overrides
    the launch configurations of ``kernels/norm_pix_loss.py`` by name ("fwd", "den", "finish")."""
    configs = configs or {}
    n, lp, d = pred.shape
    c, h, w = imgs.shape[1], imgs.shape[-2], imgs.shape[-1]
    t = imgs.shape[2] if imgs.dim() == 5 else 1
    si_t = imgs.stride(2) if imgs.dim() == 5 else 0  # an image is one frame: its time stride is never used
    gw = w // p
    hw = (h // p) * gw  # tokens per time slot
    rows = n * lp
    dev = pred.device
    fwd = configs.get("fwd") or _k.fwd_config(rows, p, c, u)
    part = torch.empty((fwd.grid,), dtype=torch.float32, device=dev)  # [G] loss partials
    loss = torch.empty((), dtype=torch.float32, device=dev)
    has_w, has_ids, prescale = weight is not None, ids is not None, pred.dtype == torch.float16 and write_grad
    unscale = torch.empty((n, lp, 1) if prescale else (), dtype=torch.float32, device=dev)  # per row for fp16
    gbuf = torch.empty((n, lp, d) if write_grad else (0,), dtype=pred.dtype, device=dev)  # [N, Lp, D]
    if has_w:  # den = sum(weight), needed by every program of the main kernel
        den = torch.empty((), dtype=torch.float32, device=dev)
        cfg = configs.get("den") or _k.den_config(weight.numel())
        launch(_k.norm_pix_loss_den_kernel)[(1,)](weight, den, weight.numel(), BLOCK=cfg.block,
                                                  num_warps=cfg.num_warps)
    else:
        den = part  # unused: den = N * M is computed in the kernels
    sid_n, sid_m = (ids.stride(0), ids.stride(1)) if has_ids else (0, 0)
    launch(_k.norm_pix_loss_fwd_kernel)[(fwd.grid,)](
        pred, imgs, weight if has_w else part, ids if has_ids else part, den, gbuf if write_grad else part,
        unscale if prescale else part, part,
        rows, lp, (t // u) * hw, hw, gw,
        pred.stride(0), pred.stride(1), pred.stride(2),
        imgs.stride(0), imgs.stride(1), si_t, imgs.stride(-2), imgs.stride(-1),
        sid_n, sid_m,
        eps,
        P=p, U=u, C=c, PP_PAD=fwd.pp_pad, C_PAD=fwd.c_pad, BLOCK_P=fwd.block_p, ITERS=fwd.iters,
        HAS_W=has_w, HAS_IDS=has_ids, NORM=norm_pix, WRITE_GRAD=write_grad, PRESCALE=prescale,
        num_warps=fwd.num_warps,
    )
    cfg = configs.get("finish") or _k.finish_config(fwd.grid)
    launch(_k.norm_pix_loss_finish_kernel)[(1,)](
        part, den, loss, unscale, fwd.grid, rows, BLOCK=cfg.block, HAS_W=has_w, PRESCALE=prescale,
        num_warps=cfg.num_warps,
    )
    return loss, gbuf, unscale


def _scale_triton(gbuf, unscale, grad_loss, out, config=None):
    """out = gbuf * (grad_loss * unscale) (unscale [] or one per row); ``out is gbuf``: in place, skipped on
    the device at factor 1 (a single unscale only)."""
    total = gbuf.numel()
    cfg = config or _k.scale_config(total)
    launch(_k.norm_pix_loss_bwd_kernel)[(cfg.grid,)](
        gbuf, grad_loss.reshape(1), unscale, out, total, max(gbuf.shape[-1], 1),
        BLOCK=cfg.block, ITERS=cfg.iters, IN_PLACE=out is gbuf, ROWS=unscale.numel() != 1 or unscale.dim() != 0,
        num_warps=cfg.num_warps,
    )
    return out


# ------------------------------------------------------------------------------------------ registered kernels
@register_op("norm_pix_loss_fwd")
def _forward(pred: Tensor, imgs: Tensor, weight: Optional[Tensor], ids: Optional[Tensor], patch_size: int,
             norm_pix: bool, eps: float, t_patch_size: int, write_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    if not (use_triton(pred) and use_triton(imgs)):  # a float64 imgs too: the float64 loss of the torch path
        return norm_pix_loss_forward_torch(pred, imgs, weight, ids, patch_size, norm_pix, eps, t_patch_size, write_grad)
    return norm_pix_loss_forward_triton(pred, imgs, weight, ids, patch_size, norm_pix, eps, t_patch_size, write_grad)


@register_op("norm_pix_loss_bwd")
def _backward(gbuf: Tensor, unscale: Tensor, grad_loss: Tensor) -> Tensor:
    """grad_pred = gbuf * (grad_loss * unscale): a new tensor, the buffer is not modified."""
    if not use_triton(gbuf):
        return (wide(gbuf) * (wide(grad_loss) * wide(unscale))).to(gbuf.dtype)
    return _scale_triton(gbuf, unscale, grad_loss, torch.empty_like(gbuf))


def _scale_in_place(gbuf: Tensor, unscale: Tensor, grad_loss: Tensor) -> Tensor:
    """The eager backward: the buffer becomes grad_pred in place (on the device: no host sync)."""
    if use_triton(gbuf):
        return _scale_triton(gbuf, unscale, grad_loss, gbuf)
    factor = wide(grad_loss) * unscale  # [] or [N, Lp, 1]
    if factor.device.type == "cpu" and factor.dim() == 0 and bool(factor == 1.0):  # a CPU scalar: no sync
        return gbuf
    return gbuf.mul_(factor)


_SECOND_BACKWARD = (
    "norm_pix_loss: backward ran a second time through the same graph (retain_graph=True). The loss "
    "computes grad_pred in its forward and the first backward handed that buffer out as the gradient, so "
    "nothing is left to return. Compute the loss again before each backward, or use torch.compile, whose "
    "graph keeps the buffer and returns a new gradient on every backward."
)


class _NormPixLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, imgs, weight, ids, p, norm_pix, eps, u):
        loss, gbuf, unscale = _forward(pred, imgs, weight, ids, p, norm_pix, eps, u, True)
        a = anchor(pred)
        if dispatching():  # traced: functional, the buffer is an ordinary saved tensor
            ctx.save_for_backward(gbuf, unscale, a)
            ctx.buffer = None
        else:  # eager: kept as an attribute so that the backward can hand it out and drop it
            ctx.save_for_backward(a)
            ctx.buffer = [gbuf, unscale]
        return loss, a

    @staticmethod
    @once_differentiable("norm_pix_loss")
    def backward(ctx, grad_loss):
        if ctx.buffer is None:
            gbuf, unscale, _ = ctx.saved_tensors
            return _backward(gbuf, unscale, grad_loss), None, None, None, None, None, None, None
        if not ctx.buffer:
            raise RuntimeError(_SECOND_BACKWARD)
        gbuf, unscale = ctx.buffer
        ctx.buffer.clear()
        return _scale_in_place(gbuf, unscale, grad_loss), None, None, None, None, None, None, None


def _loss(pred, imgs, weight, ids, p, norm_pix, eps, u):
    no_torch_func("norm_pix_loss")
    if imgs.requires_grad and torch.is_grad_enabled():  # rare (imgs are data): autograd through the formula
        return _loss_autograd(pred, imgs, weight, ids, p, norm_pix, eps, u)
    if pred.requires_grad and torch.is_grad_enabled():
        return apply(_NormPixLoss, "norm_pix_loss", pred, imgs, weight, ids, p, norm_pix, eps, u)
    return _forward(pred, imgs, weight, ids, p, norm_pix, eps, u, False)[0]  # loss only: no buffer written


# ------------------------------------------------------------------------------------------ public op
def _check_imgs_finite(imgs: Tensor, p: int, counted: Tensor, u: int = 1) -> None:
    """ValueError if a counted patch (``counted [N, L]`` bool) of imgs holds a NaN or an infinity (a sync)."""
    if bool(torch.isfinite(imgs.sum(dtype=torch.float32))):  # a NaN or inf anywhere makes the sum non-finite
        return
    video = imgs.dim() == 5
    clip = imgs if video else imgs.unsqueeze(2)  # [N, C, T, H, W]
    n, c, t, h, w = clip.shape
    bad = ~torch.isfinite(clip).reshape(n, c, t // u, u, h // p, p, w // p, p)  # [N, C, T', u, h, p, w, p]
    bad = (bad.sum(dim=(1, 3, 5, 7)) > 0).reshape(n, -1) & counted  # [N, L]
    if bool(bad.any()):
        b, l = (int(v) for v in bad.nonzero()[0])
        what, unit, units = ("clip", "tubelet", "tubelet(s)") if video else ("image", "patch", "patch(es)")
        raise ValueError(f"imgs has non-finite values (NaN or inf) in {int(bad.sum())} counted {units}, the first "
                         f"in {what} {b}, {unit} {l}: the loss would not be finite")


def norm_pix_loss(
    pred: Tensor,
    imgs: Tensor,
    mask: Optional[Tensor],
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    ids_masked: Optional[Tensor] = None,
    *,
    t_patch_size: int = 1,
    check: Optional[bool] = None,
) -> Tensor:
    """MAE reconstruction loss read straight from ``imgs``; a float32 scalar, autograd to ``pred`` (and to
    ``imgs`` when it requires grad: then by autograd through the plain formula, as the reference).

    imgs [N, C, H, W] (D = p*p*C) or a video [N, C, T, H, W] (D = u*p*p*C, u = ``t_patch_size``); pred
    [N, L, D] with mask [N, L] (1 = counted), or pred [N, M, D] with ids_masked [N, M] (M <= L distinct
    patches; mask then optional and unread). ``check``: the checks that need a device sync (default: on for
    CPU tensors, else ``MAE_FAST_CHECK_INDICES``): an empty mask, ids_masked in range and distinct,
    mask/ids agreement, NaN/inf in counted patches of imgs. Unchecked, an id outside [0, L) gives a NaN loss
    (and NaN gradient rows). Eager calls support one backward per forward.
    """
    check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES)
    patch_size, t_patch_size = check_patch_sizes(patch_size, t_patch_size)
    n, c, t, h, w, num_patches = check_clip_grid(imgs, patch_size, t_patch_size)
    eps = check_number("eps", eps, minimum=0.0)
    p, u = patch_size, t_patch_size
    d = u * p * p * c
    if norm_pix and d < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch (u*p*p*C), got {d}")
    if ids_masked is None:
        if mask is None:
            raise ValueError("mask must be given (shape [N, L]) unless ids_masked is given")
        check_tensor("mask", mask, ndim=2, dtypes=FLOAT_DTYPES + (torch.bool,))
        check_same_device(pred=pred, imgs=imgs, mask=mask)
        check_shape("pred", pred, (n, num_patches, d))
        check_shape("mask", mask, (n, num_patches))
    else:
        check_tensor("ids_masked", ids_masked, ndim=2, dtypes=INDEX_DTYPES)
        check_same_device(pred=pred, imgs=imgs, ids_masked=ids_masked, mask=mask)
        if ids_masked.shape[0] != n or ids_masked.shape[1] == 0:
            raise ValueError(
                f"ids_masked must have shape [{n}, M] with M >= 1, got [{', '.join(map(str, ids_masked.shape))}]")
        if ids_masked.shape[1] > num_patches:
            raise ValueError(f"ids_masked names M={ids_masked.shape[1]} patches but imgs has only L={num_patches}")
        check_shape("pred", pred, (n, ids_masked.shape[1], d))
        if mask is not None:
            check_tensor("mask", mask, ndim=2, dtypes=FLOAT_DTYPES + (torch.bool,))
            check_shape("mask", mask, (n, num_patches))
    if n == 0:
        raise ValueError("imgs must hold at least one image (N >= 1), got N = 0")

    do_check = check_indices_enabled(check, imgs.device)
    if ids_masked is None:
        weight = mask.to(torch.float32).contiguous()  # [N, L], no copy when already fp32 contiguous
        if do_check and not bool(weight.sum() != 0):
            raise ValueError("mask is empty (sum(mask) == 0): the masked mean is undefined")
        if do_check:
            _check_imgs_finite(imgs, p, weight != 0, u)
        return _loss(pred, imgs, weight, None, p, bool(norm_pix), eps, u)
    if do_check:
        check_distinct_rows("ids_masked", ids_masked, num_patches)
        if mask is not None:
            m = ids_masked.shape[1]
            named = mask.to(torch.float32).gather(1, ids_masked.long())  # [N, M]
            if not bool((named == 1).all()) or not bool((mask.to(torch.float32).sum(1) == m).all()):
                raise ValueError(f"mask does not match ids_masked: expected 1 at every named patch and {m} ones "
                                 f"per sample")
        counted = torch.zeros(n, num_patches, dtype=torch.bool, device=imgs.device)  # [N, L]
        _check_imgs_finite(imgs, p, counted.scatter_(1, ids_masked.long(), True), u)
    return _loss(pred, imgs, None, ids_masked, p, bool(norm_pix), eps, u)
