"""Triton kernels of the fused normalized-pixel loss (the op: ``mae_fast.ops.norm_pix_loss``).

Rows: one row per predicted patch (``R = N * Lp`` rows, ``Lp`` = L for the full form, M for the
masked-only form). A program of ``norm_pix_loss_fwd_kernel`` handles ``ITERS`` blocks of ``BLOCK_P`` rows.
A row's target is read straight from ``imgs [N, C, H, W]`` or ``[N, C, T, H, W]`` (strided, no patchified
copy) as a tile [pixels, channels] (pixel = (frame in tubelet * P + row in patch) * P + column in patch;
an image is one frame, U = 1, time stride 0), which is the patchify order (frame, row, column, channel) of
the pred row; U*P*P and C are padded to powers of two (p=14: 196 -> 256 pixels) and masked. Token l is
(slot, row, column) = (l // HW, (l % HW) // GW, l % GW) with HW = GH * GW tokens per time slot.

The forward writes the final gradient, so that backward has nothing to do when grad_output == 1.
That needs the denominator before the main kernel:
    den = sum(weight [N, L])  ``norm_pix_loss_den_kernel``: one program, fixed order, reads only the fp32
                              weight (full form); masked-only form: den = N * M = R, no kernel.

Forward (``norm_pix_loss_fwd_kernel``), per row with weight w (the mask value; 1 in the masked-only form):
    t          target patch [D] in fp32
    tn         (t - mean) / sqrt(var_unbiased + eps)      (or t when NORM is off; two-pass statistics)
    diff       pred - tn                                   (fp32, never stored)
    row_loss   mean(diff ** 2)
    grad1      2 * w * diff / (D * den)   for w != 0;   w / den (0, or NaN where den == 0) for w == 0
    gbuf       grad1 * s, stored once in pred's dtype for every row (s = 1 except fp16, below)
Rows with w == 0 are not read (their loss term is 0); their gradient row is written. Each program
writes one fp32 partial sum (sum w * row_loss); ``norm_pix_loss_finish_kernel`` (one program) adds them
in a fixed order: loss = sum / den. No float atomics anywhere: the result is deterministic.

fp16 (``PRESCALE``): the buffer holds each row times its own power of two s_row, chosen from the row's
largest |grad1| (NaN ignored) to land it in [2**14, 2**15); the forward writes ``unscale[row]`` = 1 / s_row
(exact; fp32, 4 bytes per row). ``unscale`` is a single 1 for fp32 and bf16. Why: docs/OPS.md, "fp16".

An ``ids`` value outside [0, L) names no patch: that row's target is NaN (no out-of-bounds or other-sample
read; the range test masks the load it already guards), so the loss and that row's gradient are NaN.

Backward (``norm_pix_loss_bwd_kernel``): grad_pred = gbuf * (grad_output * unscale), computed in fp32
(``ROWS``: the row's unscale). In place (eager path) every program loads the two scalars and returns at
once when the factor is exactly 1 (grad_output == 1 in fp32/bf16): no bytes move, no host sync. Out of
place (the registered op) it always writes a new tensor.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl


@triton.jit
def _row_scale(amax):
    """(s, 1 / s) for fp16 rows: powers of two with amax * s in [2**14, 2**15) (exponents kept in [-126, 126],
    so both are normal fp32 numbers); 1 where amax is 0 or not finite."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(amax)) for a normal amax
    k = tl.minimum(tl.maximum(14 - e, -126), 126)
    k = tl.where((amax > 0.0) & (e < 128), k, 0)
    s = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return s, inv


@triton.jit
def norm_pix_loss_den_kernel(w_ptr, den_ptr, T, BLOCK: tl.constexpr):
    """den = sum(w[0:T]) in fp32, one program, a fixed order (lane-wise sums, then one tree)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, T, BLOCK):
        ok = start + offs < T
        acc += tl.load(w_ptr + start + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(den_ptr, tl.sum(acc, axis=0))


@triton.jit
def norm_pix_loss_fwd_kernel(
    pred_ptr, imgs_ptr, w_ptr, ids_ptr, den_ptr, grad_ptr, unscale_ptr, part_ptr,
    R, LP, L, HW, GW,
    sp_n, sp_l, sp_d,
    si_n, si_c, si_t, si_h, si_w,
    sid_n, sid_m,
    eps,
    P: tl.constexpr, U: tl.constexpr, C: tl.constexpr, PP_PAD: tl.constexpr, C_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, ITERS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_IDS: tl.constexpr, NORM: tl.constexpr,
    WRITE_GRAD: tl.constexpr, PRESCALE: tl.constexpr,
):
    # tile [BLOCK_P rows, PP_PAD pixels (frame in tubelet, row in patch, column in patch), C_PAD
    # channels]: the pred offsets (pixel * C + channel) and the image offsets (channel plane, frame, pixel
    # row, pixel column) are each coalesced along their own axis; the compiler moves values between the
    # two layouts.
    D: tl.constexpr = U * P * P * C
    pid = tl.program_id(0)
    q = tl.arange(0, PP_PAD)  # [PP_PAD]
    ch = tl.arange(0, C_PAD)  # [C_PAD]
    lane_ok = (q < U * P * P)[:, None] & (ch < C)[None, :]  # [PP_PAD, C_PAD]
    d64 = (q * C).to(tl.int64)[:, None] + ch.to(tl.int64)[None, :]  # position in the patch vector
    img_lane = ((q // (P * P)).to(tl.int64) * si_t + ((q // P) % P).to(tl.int64) * si_h
                + (q % P).to(tl.int64) * si_w)[:, None] + ch.to(tl.int64)[None, :] * si_c  # [PP_PAD, C_PAD]
    if HAS_W:
        den = tl.load(den_ptr).to(tl.float32)  # sum(weight) from norm_pix_loss_den_kernel
    else:
        den = tl.zeros([], dtype=tl.float32) + R  # masked-only form: N * M rows of weight 1
    acc_loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid * ITERS + it).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)  # [BLOCK_P]
        row_ok = rows < R
        n = rows // LP
        m = rows % LP
        if HAS_IDS:
            l = tl.load(ids_ptr + n * sid_n + m * sid_m, mask=row_ok, other=0).to(tl.int64)
            l_ok = (l >= 0) & (l < L)
        else:
            l = m
            l_ok = row_ok
        if HAS_W:
            w = tl.load(w_ptr + n * L + l, mask=row_ok, other=0.0).to(tl.float32)
        else:
            w = tl.where(row_ok, 1.0, 0.0)
        active = row_ok & (w != 0.0)
        ps = l // HW  # tubelet slot in time (0 for an image)
        pi = (l % HW) // GW
        pj = l % GW
        img_row = n * si_n + (ps * U) * si_t + (pi * P) * si_h + (pj * P) * si_w  # [BLOCK_P]
        ok = active[:, None, None] & lane_ok[None, :, :]  # [BLOCK_P, PP_PAD, C_PAD]
        t = tl.load(imgs_ptr + img_row[:, None, None] + img_lane[None, :, :], mask=ok & l_ok[:, None, None], other=0.0)
        t = tl.where(l_ok[:, None, None], t.to(tl.float32), float("nan"))  # an id outside [0, L): no target
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
        diff = tl.where(ok, x - tn, 0.0)  # [BLOCK_P, PP_PAD, C_PAD]
        row_loss = tl.sum(tl.sum(diff * diff, axis=2), axis=1) / D  # [BLOCK_P]
        if WRITE_GRAD:
            coef = w / den  # [BLOCK_P]; 0 (NaN where den == 0) for w == 0 rows
            g = tl.where(active[:, None, None], diff * (coef * (2.0 / D))[:, None, None], coef[:, None, None])
            out_ok = row_ok[:, None, None] & lane_ok[None, :, :]  # every row, counted or not
            if PRESCALE:
                mag = tl.where(out_ok & (g == g), tl.abs(g), 0.0)  # NaN ignored, the same on every backend
                s_row, inv_row = _row_scale(tl.max(tl.max(mag, axis=2), axis=1))  # [BLOCK_P]
                g = g * s_row[:, None, None]  # exact: a power of two
                tl.store(unscale_ptr + rows, inv_row, mask=row_ok)
            tl.store(grad_ptr + (rows * D)[:, None, None] + d64[None, :, :], g.to(grad_ptr.dtype.element_ty),
                     mask=out_ok)
        acc_loss += tl.where(active, row_loss * w, 0.0)
    tl.store(part_ptr + pid, tl.sum(acc_loss, axis=0))


@triton.jit
def norm_pix_loss_finish_kernel(part_ptr, den_ptr, loss_ptr, unscale_ptr, G, R,
                                BLOCK: tl.constexpr, HAS_W: tl.constexpr, PRESCALE: tl.constexpr):
    """loss = sum(loss partials) / den; unscale = 1 unless PRESCALE (then the forward wrote it per row)."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, G, BLOCK):
        ok = start + offs < G
        acc_loss += tl.load(part_ptr + start + offs, mask=ok, other=0.0)
    total = tl.sum(acc_loss, axis=0)
    if HAS_W:
        den = tl.load(den_ptr).to(tl.float32)
    else:
        den = tl.zeros([], dtype=tl.float32) + R
    tl.store(loss_ptr, total / den)
    if not PRESCALE:
        tl.store(unscale_ptr, tl.full([], 1.0, tl.float32))


@triton.jit
def norm_pix_loss_bwd_kernel(src_ptr, go_ptr, unscale_ptr, out_ptr, T, D,
                             BLOCK: tl.constexpr, ITERS: tl.constexpr, IN_PLACE: tl.constexpr, ROWS: tl.constexpr):
    """out = src * (grad_output * unscale) over T values (``ROWS``: unscale per row of D values); in place
    and without ROWS: nothing at all when the factor is 1."""
    pid = tl.program_id(0)
    go = tl.load(go_ptr).to(tl.float32)
    if not ROWS:
        factor = go * tl.load(unscale_ptr).to(tl.float32)
        if IN_PLACE:
            if factor == 1.0:
                return
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    offs = tl.arange(0, BLOCK).to(tl.int64)  # [BLOCK]
    for it in range(ITERS):
        idx = base + it * BLOCK + offs
        ok = idx < T
        v = tl.load(src_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        if ROWS:
            v = v * (go * tl.load(unscale_ptr + idx // D, mask=ok, other=1.0))
        else:
            v = v * factor
        tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=ok)


class FwdConfig(NamedTuple):
    pp_pad: int  # U*P*P pixels padded to a power of two
    c_pad: int  # C channels padded to a power of two
    block_p: int  # patches per block
    iters: int  # blocks per program
    num_warps: int
    grid: int


class BlockConfig(NamedTuple):
    block: int
    num_warps: int


class ScaleConfig(NamedTuple):
    block: int
    iters: int
    num_warps: int
    grid: int


def _rows_per_program(R: int, block_p: int, max_programs: int):
    iters = 1
    while iters < 8 and triton.cdiv(R, block_p * iters) > max_programs:
        iters *= 2
    return iters, triton.cdiv(R, block_p * iters)


def fwd_config(R: int, P: int, C: int, U: int = 1, tile: int = 1024, max_programs: int = 1 << 16) -> FwdConfig:
    """``norm_pix_loss_fwd_kernel`` over R patches of U*P*P pixels: one patch per program and a single warp
    at p = 16 (measured fastest on an H200, docs/OPS.md); up to ITERS = 8 blocks per program past
    max_programs."""
    pp_pad, c_pad = triton.next_power_of_2(U * P * P), triton.next_power_of_2(C)
    block_p = max(1, min(16, tile // (pp_pad * c_pad)))
    num_warps = max(1, min(8, block_p * pp_pad * c_pad // 1024))
    iters, grid = _rows_per_program(R, block_p, max_programs)
    return FwdConfig(pp_pad, c_pad, block_p, iters, num_warps, grid)


def den_config(T: int, max_block: int = 16384) -> BlockConfig:
    """``norm_pix_loss_den_kernel`` over T weights (N=256, L=196: 4 loop steps of 16384)."""
    block = min(max_block, max(128, triton.next_power_of_2(T)))
    return BlockConfig(block, 4 if block <= 2048 else (8 if block <= 8192 else 16))


def scale_config(T: int, block: int = 4096, max_programs: int = 2048) -> ScaleConfig:
    """``norm_pix_loss_bwd_kernel`` over T values: few programs (up to ITERS = 8 blocks each) keep the
    launch of the in-place early exit short."""
    block = min(block, max(128, triton.next_power_of_2(T)))
    iters, grid = _rows_per_program(T, block, max_programs)
    return ScaleConfig(block, iters, 4 if block <= 2048 else 8, grid)


def finish_config(G: int, max_block: int = 8192) -> BlockConfig:
    """The finishing reduction over G partial sums."""
    block = min(max_block, max(128, triton.next_power_of_2(G)))
    return BlockConfig(block, 4 if block <= 1024 else 8)
