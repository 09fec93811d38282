"""Triton kernels of the fused normalized-pixel loss (see ``mae_fast.ops.loss``).

Rows: one row per predicted patch (``N * Lp`` rows, ``Lp`` = L for the full form, M for the
masked-only form). A program handles ``ITERS`` blocks of ``BLOCK_P`` rows. A row's target is read
straight from ``imgs [N, C, H, W]`` (strided, no patchified copy) as a tile [pixels, channels]
(pixel = row in patch * P + column in patch), which is the patchify order (row, column, channel) of
the pred row; P*P and C are padded to powers of two (p=14: 196 -> 256 pixels) and masked.

Forward (``_fwd_kernel``), per row with weight w (the mask value; 1 in the masked-only form):
    t          target patch [D] in fp32
    tn         (t - mean) / sqrt(var_unbiased + eps)      (or t when NORM is off; two-pass statistics)
    diff       pred - tn                                   -> stored in pred's dtype (kept for backward)
    row_loss   mean(diff ** 2)
Rows with w == 0 are neither read nor written (their loss term is 0; backward fills their gradient).
Each program writes two fp32 partial sums (sum w * row_loss, sum w); ``_finish_kernel`` (one
program) adds them in a fixed order: loss = sum / den. No float atomics: the result is deterministic.

Backward (``_bwd_kernel``): grad = diff * (2 * grad_output * w / (D * den)) for rows with w != 0 and
grad_output * w / den (0, or NaN exactly where the reference gives NaN) elsewhere.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(
    pred_ptr, imgs_ptr, w_ptr, ids_ptr, diff_ptr, part_ptr,
    R, LP, L, GW,
    sp_n, sp_l, sp_d,
    si_n, si_c, si_h, si_w,
    sid_n, sid_m,
    eps,
    P: tl.constexpr, C: tl.constexpr, PP_PAD: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, ITERS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_IDS: tl.constexpr, NORM: tl.constexpr,
):
    # tile [BLOCK_P rows, PP_PAD pixels (row in patch, column in patch), C_PAD channels]: the pred
    # offsets (pixel * C + channel) and the image offsets (channel plane, pixel row, pixel column) are
    # each coalesced along their own axis; the compiler moves values between the two layouts.
    D: tl.constexpr = P * P * C
    pid = tl.program_id(0)
    q = tl.arange(0, PP_PAD)  # [PP_PAD]
    ch = tl.arange(0, C_PAD)  # [C_PAD]
    lane_ok = (q < P * P)[:, None] & (ch < C)[None, :]  # [PP_PAD, C_PAD]
    d64 = (q * C).to(tl.int64)[:, None] + ch.to(tl.int64)[None, :]  # position in the patch vector
    img_lane = ((q // P).to(tl.int64) * si_h + (q % P).to(tl.int64) * si_w)[:, None] \
        + ch.to(tl.int64)[None, :] * si_c  # [PP_PAD, C_PAD]
    acc_loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_P], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BLOCK_P]
        row_ok = rows < R
        n = rows // LP
        m = rows % LP
        if HAS_IDS:
            l = tl.load(ids_ptr + n * sid_n + m * sid_m, mask=row_ok, other=0).to(tl.int64)
        else:
            l = m
        if HAS_W:
            w = tl.load(w_ptr + n * L + l, mask=row_ok, other=0.0).to(tl.float32)
        else:
            w = tl.where(row_ok, 1.0, 0.0)
        active = row_ok & (w != 0.0)
        pi = l // GW
        pj = l % GW
        img_row = n * si_n + (pi * P) * si_h + (pj * P) * si_w  # [BLOCK_P]
        ok = active[:, None, None] & lane_ok[None, :, :]  # [BLOCK_P, PP_PAD, C_PAD]
        t = tl.load(imgs_ptr + img_row[:, None, None] + img_lane[None, :, :], mask=ok, other=0.0)
        t = t.to(tl.float32)
        x = tl.load(pred_ptr + (n * sp_n + m * sp_l)[:, None, None] + d64[None, :, :] * sp_d, mask=ok, other=0.0)
        x = x.to(tl.float32)
        if NORM:
            mean = tl.sum(tl.sum(t, axis=2), axis=1) / D  # [BLOCK_P]
            tc = tl.where(ok, t - mean[:, None, None], 0.0)
            var = tl.sum(tl.sum(tc * tc, axis=2), axis=1) / (D - 1)
            rstd = 1.0 / tl.sqrt_rn((var + eps).to(tl.float32))  # eps may come in as fp64 (inductor)
            tn = tc * rstd[:, None, None]
        else:
            tn = t
        diff = tl.where(ok, x - tn, 0.0)
        row_loss = tl.sum(tl.sum(diff * diff, axis=2), axis=1) / D  # [BLOCK_P]
        tl.store(diff_ptr + (rows * D)[:, None, None] + d64[None, :, :], diff.to(diff_ptr.dtype.element_ty), mask=ok)
        acc_loss += tl.where(active, row_loss * w, 0.0)
        acc_w += tl.where(row_ok, w, 0.0)
    tl.store(part_ptr + pid * 2, tl.sum(acc_loss, axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(acc_w, axis=0))


@triton.jit
def _finish_kernel(part_ptr, loss_ptr, den_ptr, G, BLOCK: tl.constexpr):
    """loss = sum(loss partials) / sum(weight partials), den = sum(weight partials)."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, G, BLOCK):
        ok = start + offs < G
        acc_loss += tl.load(part_ptr + (start + offs) * 2, mask=ok, other=0.0)
        acc_w += tl.load(part_ptr + (start + offs) * 2 + 1, mask=ok, other=0.0)
    total = tl.sum(acc_loss, axis=0)
    den = tl.sum(acc_w, axis=0)
    tl.store(loss_ptr, total / den)
    tl.store(den_ptr, den)


@triton.jit
def _bwd_kernel(
    diff_ptr, w_ptr, den_ptr, go_ptr, out_ptr,
    R, LP, L, two_over_d,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, ITERS: tl.constexpr,
    HAS_W: tl.constexpr,
):
    pid = tl.program_id(0)
    d64 = tl.arange(0, D_PAD).to(tl.int64)  # [D_PAD]
    d_ok = d64 < D
    go = tl.load(go_ptr).to(tl.float32)
    den = tl.load(den_ptr).to(tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BLOCK_P]
        row_ok = rows < R
        if HAS_W:
            w = tl.load(w_ptr + (rows // LP) * L + rows % LP, mask=row_ok, other=0.0).to(tl.float32)
        else:
            w = tl.where(row_ok, 1.0, 0.0)
        coef = go * w / den  # [BLOCK_P]
        active = row_ok & (w != 0.0)
        offs = rows[:, None] * D + d64[None, :]  # [BLOCK_P, D_PAD]
        s = tl.load(diff_ptr + offs, mask=active[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        scale = (coef * two_over_d).to(tl.float32)  # two_over_d may come in as fp64 (inductor)
        g = tl.where(active[:, None], s * scale[:, None], coef[:, None])
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _rows_per_program(R: int, block_p: int, max_programs: int):
    iters = 1
    while iters < 8 and triton.cdiv(R, block_p * iters) > max_programs:
        iters *= 2
    return iters, triton.cdiv(R, block_p * iters)


def fwd_config(R: int, P: int, C: int, tile: int = 1024, max_programs: int = 1 << 16):
    """(PP_PAD, C_PAD, BLOCK_P, ITERS, num_warps, grid) of ``_fwd_kernel`` over R patches.

    Measured on an H200 (N=256, 224x224, bf16, p=16 and 14): one patch per program with a single warp
    was fastest (67 us vs 75 us for two patches and two warps, 79-118 us for a flat image-order tile).
    """
    pp_pad, c_pad = triton.next_power_of_2(P * P), triton.next_power_of_2(C)
    block_p = max(1, min(16, tile // (pp_pad * c_pad)))
    num_warps = max(1, min(8, block_p * pp_pad * c_pad // 1024))
    iters, grid = _rows_per_program(R, block_p, max_programs)
    return pp_pad, c_pad, block_p, iters, num_warps, grid


def bwd_config(R: int, D: int, tile: int = 4096, max_programs: int = 1 << 14):
    """(D_PAD, BLOCK_P, ITERS, num_warps, grid) of the backward over R rows of D values."""
    d_pad = triton.next_power_of_2(D)
    block_p = max(1, min(16, tile // d_pad))
    size = block_p * d_pad
    num_warps = 4 if size <= 2048 else (8 if size <= 8192 else 16)
    iters, grid = _rows_per_program(R, block_p, max_programs)
    return d_pad, block_p, iters, num_warps, grid


def finish_config(G: int):
    """(BLOCK, num_warps) of the finishing reduction over G partial pairs."""
    block = min(8192, max(128, triton.next_power_of_2(G)))
    return block, (4 if block <= 1024 else 8)
