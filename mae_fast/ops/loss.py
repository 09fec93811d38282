"""Fused normalized-pixel loss: patchify, per-patch statistics, MSE, masked mean and gradient in one pass.

``norm_pix_loss(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6, ids_masked=None, *, t_patch_size=1)``
equals the official MAE ``forward_loss`` (``mae_fast.reference.patch_loss``) without building the
patchified target: ``imgs [N, C, H, W]`` is read in place, one pass computes each patch's loss and its
gradient.

Video: ``imgs [N, C, T, H, W]`` with tubelets of u = ``t_patch_size`` frames (T' = T/u, h = H/p, w = W/p):
token l is (slot, row, column) = (l // (h*w), (l % (h*w)) // w, l % w), L = T'*h*w, D = u*p*p*C and the
target vector is in (frame, row, column, channel) order, the reference video patchify
``imgs.reshape(N, C, T', u, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(N, L, D)``. An image is
the case T = u = 1 (D = p*p*C in (row, column, channel) order). Everything below holds for both.

Two forms:
- full: ``pred [N, L, D]`` for every patch, ``mask [N, L]`` weights (1 = counted);
  loss = sum(row_loss * mask) / sum(mask).
- masked-only: ``pred [N, M, D]`` for the removed patches only, ``ids_masked [N, M]`` naming them
  (token index as above); every named patch counts with weight 1, loss = sum(row_loss) / (N * M).
  ``mask`` may then be None; if a mask is given it must have shape [N, L] and its values are not read
  (with checks on they are compared with ``ids_masked``: 1 at every named patch, M ones per sample).

Gradient: the forward computes the final gradient for grad_output == 1,
grad1 = 2 * w * (pred - target_normalized) / (D * sum(mask)) (w / sum(mask) for rows with w == 0: 0, or NaN
where sum(mask) == 0), and writes it once into a pred-shaped buffer in pred's dtype. sum(mask) comes from a
small deterministic pre-pass over the fp32 mask (full form) or is N * M (masked-only form). Backward then
costs nothing when grad_output == 1 (the usual ``loss.backward()``) and one in-place pass otherwise:
grad_pred = buffer * grad_output. On the Triton path the buffer is the only pred-sized memory of the op;
it is alive from forward to backward (or until the graph is freed) and then becomes grad_pred. Nothing is
recomputed and no user tensor is modified.
- Eager (CUDA, and CPU too): the backward scales the buffer in place, on the device (no host sync; when
  grad_output == 1 every program returns at once), returns it as grad_pred and keeps no reference to it.
  A second backward through the same graph (``retain_graph=True``) therefore raises RuntimeError: compute
  the loss again for each backward. Without a gradient to compute (``torch.no_grad()`` or a pred that does
  not require grad) no buffer is written at all.
- torch.compile (and ``_EAGER_FAST_PATH = False``) goes through the registered ops, which are functional:
  backward returns a new tensor buffer * grad_output and a second backward works.
- fp16 pred: grad1 (of the order 1 / (D * sum(mask)), about 1e-7 at N=256, p=16) lies below fp16's
  normal range, so the buffer holds grad1 times a power of two and backward multiplies by grad_output
  over that power of two, always (one in-place pass even at grad_output == 1). This keeps a GradScaler's
  scaled gradients accurate.

Dispatch: CUDA (or CPU under ``TRITON_INTERPRET=1``) runs the Triton kernels of
``mae_fast.kernels.norm_pix_loss``; CPU runs the plain torch path below. The kernels are registered as
``mae_fast::norm_pix_loss_fwd`` / ``mae_fast::norm_pix_loss_bwd`` (triton_op + register_autograd), which is
what torch.compile traces; eager calls run the same kernels (or the torch path) from a plain
autograd.Function, because the custom-op dispatch cost several times the kernels' own time on the host
(see ``_EagerNormPixLoss``). The torch path works in place on its own fp32 copy of the targets.

Semantics beyond the reference, all documented choices:
- Patches with mask 0 are not read at all (a quarter of imgs and pred at 75% masking); their gradient
  rows are written (zeros). The reference's 0 * NaN would let a NaN/inf in an uncounted patch of pred or
  imgs turn the loss into NaN; here it does not.
- The loss is returned in float32 for every input dtype (statistics and accumulation are fp32).
- Rounding: in bf16 the gradient is rounded once to pred's dtype at grad_output == 1. For other
  grad_output values, and always in fp16, it is rounded twice (the buffer, then the scaled result): at
  most about one ulp more than a single rounding (with a power-of-two grad_output, as a GradScaler's,
  the second rounding is exact unless the result is subnormal).
- ``pred`` and ``imgs`` may have different float dtypes (bf16 pred with fp32 imgs under autocast).
- Gradients flow to ``pred`` only; ``imgs`` and ``mask`` are constants.
- Checks that need a device sync (empty mask, ``ids_masked`` range, mask/ids agreement, and a NaN or
  an infinity in a counted patch of ``imgs``) run on CPU always and on CUDA when ``check=True`` or
  ``MAE_FAST_CHECK_INDICES=1``; they are skipped while torch.compile traces. They raise ValueError naming
  the argument. Unchecked, an empty mask gives a NaN loss (as in the reference) and a non-finite counted
  patch of imgs a non-finite loss and gradient. Uncounted patches are not checked (they are not read).
"""
from __future__ import annotations

from typing import Optional

import torch

from mae_fast.kernels import norm_pix_loss as _k

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_clip_grid,
    check_index_range,
    check_indices_enabled,
    check_same_device,
    check_shape,
    check_tensor,
    use_triton,
)

__all__ = ["norm_pix_loss", "norm_pix_loss_torch"]


# ---------------------------------------------------------------------------------------------
# plain torch path (CPU path and the same-dtype test oracle)
# ---------------------------------------------------------------------------------------------
def _patch_targets(imgs: torch.Tensor, p: int, u: int = 1) -> torch.Tensor:
    """imgs [N, C, H, W] or [N, C, T, H, W] -> fp32 targets [N, L, u*p*p*C] in patchify order (u, p, p, C)."""
    v = imgs.unsqueeze(2) if imgs.dim() == 4 else imgs  # [N, C, T, H, W], T = 1 for an image
    n, c, t, h, w = v.shape
    x = v.float().reshape(n, c, t // u, u, h // p, p, w // p, p)  # [N, C, T', u, h, p, w, p]
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [N, T', h, w, u, p, p, C]
    return x.reshape(n, (t // u) * (h // p) * (w // p), u * p * p * c)  # [N, L, D]


def _pow2_scale_torch(den: torch.Tensor, d: int) -> torch.Tensor:
    """The fp16 prescale s of the kernels (``_pow2_scale``): a power of two in (D*den/8, D*den/4], else 1."""
    x = den.float().reshape(()) * (d * 0.25)
    p2 = (x.view(torch.int32) & 0x7F800000).view(torch.float32)  # exponent bits only
    return torch.where((x >= 1.0) & (x < 1e30), p2, 1.0)


def _fwd_torch(pred, imgs, weight, ids, p: int, norm_pix: bool, eps: float, write_grad: bool = True, u: int = 1):
    """(loss fp32 [], gbuf [N, Lp, D] in pred's dtype or None, unscale fp32 []): see the module docstring.

    Works in place on its own fp32 target copy: patchify (one copy), statistics, normalise, diff and
    gradient reuse that one buffer.
    """
    n, lp, d = pred.shape
    t = _patch_targets(imgs, p, u)  # [N, L, D] fp32
    if ids is not None:
        t = t.gather(1, ids.long()[:, :, None].expand(n, lp, d))  # [N, M, D], a new tensor
        w = torch.ones(n, lp, dtype=torch.float32, device=pred.device)  # [N, M]
        den = torch.full((), float(n * lp), dtype=torch.float32, device=pred.device)  # N * M, no reduction
    else:
        w = weight.float()  # [N, L]
        den = w.sum()
    if t._is_view():
        t = t.clone()  # patchify was a view (of imgs, e.g. one patch per image): never write to the user's tensor
    if norm_pix:
        var, mean = torch.var_mean(t, dim=-1, keepdim=True)  # unbiased, [N, Lp, 1]
        t.sub_(mean).mul_(torch.rsqrt(var + eps))  # normalized target
    diff = t.neg_().add_(pred)  # pred - target, fp32, in the same buffer
    active = w != 0  # [N, Lp]
    row = torch.linalg.vecdot(diff, diff) / d  # [N, Lp]
    loss = torch.where(active, row * w, 0.0).sum() / den
    unscale = torch.ones((), dtype=torch.float32, device=pred.device)
    if not write_grad:
        return loss, None, unscale
    grad1 = diff.mul_((w * (2.0 / d) / den)[:, :, None])  # 2 * w * diff / (D * den)
    if ids is None:  # rows with w == 0: w / den (0, or NaN where den == 0), whatever pred/imgs hold there
        grad1.masked_fill_(~active[:, :, None], torch.zeros((), device=den.device) / den)
    if pred.dtype == torch.float16:
        s = _pow2_scale_torch(den, d)
        grad1.mul_(s)
        unscale = 1.0 / s
    return loss, grad1.to(pred.dtype), unscale


def _bwd_torch(gbuf, unscale, grad_loss):
    """grad_pred [N, Lp, D] = gbuf * (grad_loss * unscale) in fp32, a new tensor in gbuf's dtype."""
    return (gbuf.float() * (grad_loss.float() * unscale.float())).to(gbuf.dtype)


def norm_pix_loss_torch(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6, ids_masked=None, *, t_patch_size=1):
    """The plain torch formula (fp32 statistics), no autograd wrapper: loss only."""
    weight = None if ids_masked is not None else mask
    return _fwd_torch(pred, imgs, weight, ids_masked, patch_size, norm_pix, eps, u=t_patch_size)[0]


# ---------------------------------------------------------------------------------------------
# Triton launches (shared by the custom ops and the eager fast path)
# ---------------------------------------------------------------------------------------------
def _kernel(fn, wrap: bool):
    return torch.library.wrap_triton(fn) if wrap else fn


def _fwd_triton(pred, imgs, weight, ids, p: int, norm_pix: bool, eps: float, wrap: bool, write_grad: bool = True,
                u: int = 1):
    """Forward kernels: (loss fp32 [], gbuf [N, Lp, D] in pred's dtype or None, unscale fp32 [])."""
    n, lp, d = pred.shape
    c, h, w = imgs.shape[1], imgs.shape[-2], imgs.shape[-1]
    t = imgs.shape[2] if imgs.dim() == 5 else 1
    si_t = imgs.stride(2) if imgs.dim() == 5 else 0  # an image is one frame: its time stride is never used
    gw = w // p
    hw = (h // p) * gw  # tokens per time slot
    rows = n * lp
    dev = pred.device
    pp_pad, c_pad, block_p, iters, num_warps, grid = _k.fwd_config(rows, p, c, u)
    part = torch.empty((grid,), dtype=torch.float32, device=dev)  # [G] loss partials
    loss = torch.empty((), dtype=torch.float32, device=dev)
    unscale = torch.empty((), dtype=torch.float32, device=dev)
    gbuf = torch.empty((n, lp, d), dtype=pred.dtype, device=dev) if write_grad else None  # [N, Lp, D]
    has_w = weight is not None
    has_ids = ids is not None
    prescale = pred.dtype == torch.float16
    if has_w:  # den = sum(weight), needed by every program of the main kernel
        den = torch.empty((), dtype=torch.float32, device=dev)
        block, dw = _k.den_config(weight.numel())
        _kernel(_k._den_kernel, wrap)[(1,)](weight, den, weight.numel(), BLOCK=block, num_warps=dw)
    else:
        den = part  # unused: den = N * M is computed in the kernels
    sid_n, sid_m = (ids.stride(0), ids.stride(1)) if has_ids else (0, 0)
    _kernel(_k._fwd_kernel, wrap)[(grid,)](
        pred, imgs, weight if has_w else part, ids if has_ids else part, den,
        gbuf if write_grad else part, part,
        rows, lp, (t // u) * hw, hw, gw,
        pred.stride(0), pred.stride(1), pred.stride(2),
        imgs.stride(0), imgs.stride(1), si_t, imgs.stride(-2), imgs.stride(-1),
        sid_n, sid_m,
        eps,
        P=p, U=u, C=c, PP_PAD=pp_pad, C_PAD=c_pad, BLOCK_P=block_p, ITERS=iters,
        HAS_W=has_w, HAS_IDS=has_ids, NORM=norm_pix, WRITE_GRAD=write_grad, PRESCALE=prescale,
        num_warps=num_warps,
    )
    block, fw = _k.finish_config(grid)
    _kernel(_k._finish_kernel, wrap)[(1,)](
        part, den, loss, unscale, grid, rows, D=d, BLOCK=block, HAS_W=has_w, PRESCALE=prescale, num_warps=fw
    )
    return loss, gbuf, unscale


def _scale_triton(gbuf, unscale, grad_loss, out, wrap: bool):
    """out = gbuf * (grad_loss * unscale); ``out is gbuf``: in place, skipped on the device when the factor is 1."""
    total = gbuf.numel()
    block, iters, num_warps, grid = _k.scale_config(total)
    _kernel(_k._scale_kernel, wrap)[(grid,)](
        gbuf, grad_loss.reshape(1), unscale, out, total,
        BLOCK=block, ITERS=iters, IN_PLACE=out is gbuf, num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# the custom ops (what torch.compile sees) and the eager fast path
# ---------------------------------------------------------------------------------------------
@torch.library.triton_op("mae_fast::norm_pix_loss_fwd", mutates_args=())
def _norm_pix_loss_fwd(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    weight: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    patch_size: int,
    norm_pix: bool,
    eps: float,
    t_patch_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 [], gbuf [N, Lp, D] = the gradient for grad_output 1 (times s in fp16), unscale fp32 [])."""
    if not use_triton(pred):
        return _fwd_torch(pred, imgs, weight, ids, patch_size, norm_pix, eps, u=t_patch_size)
    return _fwd_triton(pred, imgs, weight, ids, patch_size, norm_pix, eps, wrap=True, u=t_patch_size)


@torch.library.triton_op("mae_fast::norm_pix_loss_bwd", mutates_args=())
def _norm_pix_loss_bwd(gbuf: torch.Tensor, unscale: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad_pred [N, Lp, D] = gbuf * (grad_loss * unscale): a new tensor, the saved buffer is not modified."""
    if not use_triton(gbuf):
        return _bwd_torch(gbuf, unscale, grad_loss)
    return _scale_triton(gbuf, unscale, grad_loss, torch.empty_like(gbuf), wrap=True)


def _setup_context(ctx, inputs, output):
    _, gbuf, unscale = output
    ctx.save_for_backward(gbuf, unscale)
    ctx.mark_non_differentiable(gbuf, unscale)
    ctx.set_materialize_grads(False)  # no zero-filled pred-sized grad for the non-differentiable gbuf


def _backward(ctx, grad_loss, grad_gbuf, grad_unscale):
    gbuf, unscale = ctx.saved_tensors
    grad_pred = _norm_pix_loss_bwd(gbuf, unscale, grad_loss) if ctx.needs_input_grad[0] else None
    return grad_pred, None, None, None, None, None, None, None


torch.library.register_autograd("mae_fast::norm_pix_loss_fwd", _backward, setup_context=_setup_context)


_SECOND_BACKWARD = (
    "norm_pix_loss: backward ran a second time through the same graph (retain_graph=True). The eager "
    "fast path computes grad_pred in the forward and the first backward handed that buffer out as the "
    "gradient (scaled in place by grad_output, no copy kept), so there is nothing left to return. Compute "
    "the loss again (call norm_pix_loss once more) before each backward, or use torch.compile, whose "
    "registered ops keep the buffer and return a new gradient on every backward."
)


def _fwd_any(pred, imgs, weight, ids, p, norm_pix, eps, write_grad=True, u=1):
    """The forward of whichever path ``pred``'s device takes (Triton kernels, or the torch path)."""
    if use_triton(pred):
        return _fwd_triton(pred, imgs, weight, ids, p, norm_pix, eps, wrap=False, write_grad=write_grad, u=u)
    return _fwd_torch(pred, imgs, weight, ids, p, norm_pix, eps, write_grad=write_grad, u=u)


class _EagerNormPixLoss(torch.autograd.Function):
    """Eager-mode fast path: the kernels (or, on a CPU, the torch path) called directly.

    The custom-op dispatch (triton_op + register_autograd) cost about 0.6 ms of host time per
    forward+backward on torch 2.11 (measured on an H200), several times the kernels' own time; eager
    calls therefore go through a plain autograd.Function, and torch.compile (and
    ``_EAGER_FAST_PATH = False``) goes through the registered ops.

    The forward's gradient buffer is kept as a ctx attribute (not saved_tensors, which could not be
    released in backward) and handed out by the one backward: scaled in place by grad_output (nothing
    moves when grad_output == 1), returned as grad_pred, and dropped from ctx so that it lives on only as
    the caller's gradient. A second backward through the graph raises.
    """

    @staticmethod
    def forward(ctx, pred, imgs, weight, ids, p, norm_pix, eps, u):
        loss, gbuf, unscale = _fwd_any(pred, imgs, weight, ids, p, norm_pix, eps, u=u)
        ctx.gbuf, ctx.unscale = gbuf, unscale
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gbuf = ctx.gbuf
        if gbuf is None:
            raise RuntimeError(_SECOND_BACKWARD)
        ctx.gbuf = None
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None
        if use_triton(gbuf):
            grad_pred = _scale_triton(gbuf, ctx.unscale, grad_loss, gbuf, wrap=False)  # in place
        else:
            factor = grad_loss.float() * ctx.unscale  # a CPU scalar: comparing it costs no sync
            grad_pred = gbuf if bool(factor == 1.0) else gbuf.mul_(factor)
        del gbuf
        return grad_pred, None, None, None, None, None, None, None


_EAGER_FAST_PATH = True


def _loss(pred, imgs, weight, ids, p, norm_pix, eps, u):
    if _EAGER_FAST_PATH and not _is_compiling():
        if not (pred.requires_grad and torch.is_grad_enabled()):  # loss only: no gradient buffer written
            return _fwd_any(pred, imgs, weight, ids, p, norm_pix, eps, write_grad=False, u=u)[0]
        return _EagerNormPixLoss.apply(pred, imgs, weight, ids, p, norm_pix, eps, u)
    return _norm_pix_loss_fwd(pred, imgs, weight, ids, p, norm_pix, eps, u)[0]


# ---------------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------------
def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _check_imgs_finite(imgs: torch.Tensor, p: int, counted: torch.Tensor, u: int = 1) -> None:
    """ValueError if a counted patch or tubelet (``counted [N, L]`` bool) of imgs holds a NaN or an infinity
    (a sync)."""
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
        raise ValueError(
            f"imgs has non-finite values (NaN or inf) in {int(bad.sum())} counted {units}, the first in "
            f"{what} {b}, {unit} {l}: the loss would not be finite"
        )


def norm_pix_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: Optional[torch.Tensor],
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    ids_masked: Optional[torch.Tensor] = None,
    *,
    t_patch_size: int = 1,
    check: Optional[bool] = None,
) -> torch.Tensor:
    """MAE reconstruction loss read straight from ``imgs``; returns a float32 scalar, autograd to ``pred``.

    imgs [N, C, H, W] (D = p*p*C), or a video [N, C, T, H, W] with tubelets of u = ``t_patch_size`` frames
    (D = u*p*p*C; u must be 1 for 4-D imgs). pred [N, L, D] with mask [N, L] (1 = counted), or pred
    [N, M, D] with ids_masked [N, M] (mask then optional and unread). ``check``: run the checks that need
    a device sync (default: on for CPU tensors, else ``MAE_FAST_CHECK_INDICES``; they include a NaN/inf
    check of the counted patches of ``imgs``). Eager CUDA calls support one backward per forward. See the
    module docstring.
    """
    check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES)
    n, c, t, h, w, num_patches = check_clip_grid(imgs, patch_size, t_patch_size)
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    p, u = patch_size, t_patch_size
    d = u * p * p * c
    if norm_pix and d < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch (u*p*p*C), got {d}")
    if ids_masked is None:
        if mask is None:
            raise ValueError("mask must be given (shape [N, L]) unless ids_masked is given")
        check_tensor("mask", mask, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64, torch.bool))
        check_same_device(pred=pred, imgs=imgs, mask=mask)
        check_shape("pred", pred, (n, num_patches, d))
        check_shape("mask", mask, (n, num_patches))
    else:
        check_tensor("ids_masked", ids_masked, ndim=2, dtypes=INDEX_DTYPES)
        check_same_device(pred=pred, imgs=imgs, ids_masked=ids_masked, mask=mask)
        if ids_masked.shape[0] != n or ids_masked.shape[1] == 0:
            raise ValueError(
                f"ids_masked must have shape [{n}, M] with M >= 1, got [{', '.join(map(str, ids_masked.shape))}]"
            )
        check_shape("pred", pred, (n, ids_masked.shape[1], d))
        if mask is not None:
            check_tensor("mask", mask, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64, torch.bool))
            check_shape("mask", mask, (n, num_patches))
    if n == 0:
        raise ValueError("imgs must hold at least one image (N >= 1), got N = 0")

    do_check = (imgs.device.type == "cpu" or check_indices_enabled(check)) and not _is_compiling()
    if check is False:
        do_check = False
    if ids_masked is None:
        weight = mask.to(torch.float32).contiguous()  # [N, L], no copy when already fp32 contiguous
        if do_check and not bool(weight.sum() != 0):
            raise ValueError("mask is empty (sum(mask) == 0): the masked mean is undefined")
        if do_check:
            _check_imgs_finite(imgs, p, weight != 0, u)
        return _loss(pred, imgs, weight, None, p, bool(norm_pix), eps, u)
    else:
        if do_check:
            check_index_range("ids_masked", ids_masked, num_patches)
            if mask is not None:
                m = ids_masked.shape[1]
                named = mask.to(torch.float32).gather(1, ids_masked.long())  # [N, M]
                if not bool((named == 1).all()) or not bool((mask.to(torch.float32).sum(1) == m).all()):
                    raise ValueError(
                        "mask does not match ids_masked: expected 1 at every named patch and "
                        f"{m} ones per sample"
                    )
            counted = torch.zeros(n, num_patches, dtype=torch.bool, device=imgs.device)  # [N, L]
            _check_imgs_finite(imgs, p, counted.scatter_(1, ids_masked.long(), True), u)
        return _loss(pred, imgs, None, ids_masked, p, bool(norm_pix), eps, u)
