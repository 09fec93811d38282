"""Triton kernels: visible-token gather with optional position add and prefix rows (cls), and its backward.

Forward:  x [N, L, D], ids_keep [N, K] -> out [N, P+K, D]
          out[n, j]   = prefix[0, j]                                   (j < P)
          out[n, P+k] = x[n, ids_keep[n, k]] (+ pos[0, ids_keep[n, k]])
          An id outside [0, L) names no row: its output row is NaN (never another sample's or out-of-bounds
          data); it is masked in the same comparison that already guards the load, so it costs no bytes.
Backward: l-major: one program per (output position of x or prefix row, D block, N split); it walks N,
          writes grad_x rows (zero at removed tokens) and accumulates the pos / prefix sums in fp32 into
          per-split partials [S, P+L, D] that the caller sums in a fixed order (deterministic, no atomics).
          Token l's gradient comes from the output row code[n, l] of the inverse map (``index_map.py``);
          when ids repeat l, from the sum over its chain, in ascending k (torch.gather's gradient). Without
          repeats the chain is never read.

All row offsets are int64; strides are passed so strided inputs are read in place (a stride of 1 is
specialised by Triton, which keeps the loads vectorised).
"""
import triton
import triton.language as tl

from ._tiles import column_block, indexed_rows
from .index_map import first_and_chain


@triton.jit
def gather_tokens_fwd_kernel(
    x_ptr, ids_ptr, pos_ptr, prefix_ptr, out_ptr,
    R, T, P, D, L,  # R = N*T output rows, T = P+K, L rows of x
    sxn, sxl, sxd,
    sin, sik,
    spl, spd,
    sfp, sfd,
    HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok, n, j, is_tok, src, src_ok = indexed_rows(ids_ptr, sin, sik, R, T, P, L, BLOCK_R)  # [BR]
    cols, col_ok = column_block(BLOCK_D, D)  # [BD]
    m_tok = (is_tok & src_ok)[:, None] & col_ok[None, :]
    val = tl.load(x_ptr + n[:, None] * sxn + src[:, None] * sxl + cols[None, :] * sxd, mask=m_tok, other=0.0)
    if HAS_POS:
        pos = tl.load(pos_ptr + src[:, None] * spl + cols[None, :] * spd, mask=m_tok, other=0.0)
        val = val.to(tl.float32) + pos.to(tl.float32)
    val = tl.where((is_tok & ~src_ok)[:, None], float("nan"), val.to(tl.float32))
    if HAS_PREFIX:
        is_pre = row_ok & (j < P)
        jp = tl.where(is_pre, j, 0)
        pre = tl.load(prefix_ptr + jp[:, None] * sfp + cols[None, :] * sfd,
                      mask=is_pre[:, None] & col_ok[None, :], other=0.0)
        val = tl.where(is_pre[:, None], pre.to(tl.float32), val.to(tl.float32))
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], val.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def gather_tokens_bwd_kernel(
    g_ptr, code_ptr, nxt_ptr, gx_ptr, part_ptr,
    N, L, P, K, D, CHUNK_N,
    sgn, sgt, sgd,
    NEED_X: tl.constexpr, NEED_POS: tl.constexpr, NEED_PREFIX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (r, d, s): r < P reduces prefix row r; r >= P handles token l = r - P of x.
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    s = tl.program_id(2)
    col_ok = cols < D
    n_lo = s * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if r < P:
        if NEED_PREFIX:
            for n0 in range(n_lo, n_hi, BLOCK_N):
                ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
                m = (ns < n_hi)[:, None] & col_ok[None, :]
                g = tl.load(g_ptr + ns[:, None] * sgn + r * sgt + cols[None, :] * sgd, mask=m, other=0.0)
                acc += tl.sum(g.to(tl.float32), axis=0)
            tl.store(part_ptr + (s.to(tl.int64) * (P + L) + r) * D + cols, acc, mask=col_ok)
    else:
        l = r - P
        for n0 in range(n_lo, n_hi, BLOCK_N):
            ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
            n_ok = ns < n_hi
            code = tl.load(code_ptr + ns * L + l, mask=n_ok, other=2147483647)  # [BN]
            k, hit, nk = first_and_chain(code, nxt_ptr + ns * K, n_ok)
            g = tl.load(g_ptr + ns[:, None] * sgn + (P + k)[:, None] * sgt + cols[None, :] * sgd,
                        mask=hit[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            while tl.max(nk, axis=0) >= 0:  # only where ids repeat l
                more = nk >= 0
                k2 = nk.to(tl.int64)
                g += tl.load(g_ptr + ns[:, None] * sgn + (P + k2)[:, None] * sgt + cols[None, :] * sgd,
                             mask=more[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                nk = tl.load(nxt_ptr + ns * K + k2, mask=more, other=-1)
            if NEED_X:
                tl.store(gx_ptr + (ns[:, None] * L + l) * D + cols[None, :], g.to(gx_ptr.dtype.element_ty),
                         mask=n_ok[:, None] & col_ok[None, :])
            if NEED_POS:
                acc += tl.sum(g, axis=0)
        if NEED_POS:
            tl.store(part_ptr + (s.to(tl.int64) * (P + L) + r) * D + cols, acc, mask=col_ok)
