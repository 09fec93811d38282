"""Triton kernels: decoder input in one pass: unshuffle + mask-token fill + position add, and its backward.

Forward:  x [N, P+K, D], ids_restore [N, L], mask_token [1, 1, D] -> out [N, P+L, D]
          out[n, j]   = x[n, j] (+ pos[0, j])                                          (j < P)
          out[n, P+l] = (x[n, P+r] if r < K else mask_token) (+ pos[0, P+l]),  r = ids_restore[n, l]
          An r outside [0, L) names no row: the output row is NaN (no out-of-bounds or other-sample read;
          the range test masks loads it already guards, no extra bytes).
Backward: l-major: one program per (output position, D block, N split) walks N: grad_x rows are written
          once each where ids_restore is a permutation, the grad pos and grad mask_token sums go to fp32
          per-split partials the caller sums in a fixed order (deterministic, no atomics). A row of
          ids_restore that is not a permutation (an r named twice or never, or out of range) leaves its
          grad_x rows racy or unwritten; ``unshuffle_tokens_fix_kernel``, launched after it, finds those
          samples (the inverse map of ``index_map.py``) and rewrites their grad_x rows as sums over the l
          that name each r (torch.gather's gradient). Samples whose row is a permutation cost it the map
          only.
"""
import triton
import triton.language as tl

from ._tiles import column_block, indexed_rows
from .index_map import build_map, first_and_chain


@triton.jit
def unshuffle_tokens_fwd_kernel(
    x_ptr, ids_ptr, mask_ptr, pos_ptr, out_ptr,
    R, T, P, K, D, L,  # R = N*T output rows, T = P+L
    sxn, sxt, sxd,
    sin, sil,
    smd,
    spt, spd,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok, n, j, is_tok, r, r_ok = indexed_rows(ids_ptr, sin, sil, R, T, P, L, BLOCK_R)  # [BR]
    cols, col_ok = column_block(BLOCK_D, D)  # [BD]
    from_x = row_ok & ((j < P) | (r_ok & (r < K)))
    src = tl.where(j < P, j, P + r)
    v = tl.load(x_ptr + n[:, None] * sxn + src[:, None] * sxt + cols[None, :] * sxd,
                mask=from_x[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    mt = tl.load(mask_ptr + cols * smd, mask=col_ok, other=0.0).to(tl.float32)  # [BD]
    v = tl.where(from_x[:, None], v, mt[None, :])
    if HAS_POS:
        pos = tl.load(pos_ptr + j[:, None] * spt + cols[None, :] * spd,
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        v = v + pos.to(tl.float32)
    v = tl.where((is_tok & ~r_ok)[:, None], float("nan"), v)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def unshuffle_tokens_bwd_kernel(
    g_ptr, ids_ptr, gx_ptr, ppos_ptr, pmask_ptr,
    N, L, P, K, D, CHUNK_N,
    sgn, sgt, sgd,
    sin, sil,
    NEED_X: tl.constexpr, NEED_POS: tl.constexpr, NEED_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    jrow = tl.program_id(0)  # output position in [0, P+L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    s = tl.program_id(2)
    col_ok = cols < D
    n_lo = s * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    T_in = P + K
    acc_pos = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_mask = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
        n_ok = ns < n_hi
        m = n_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + ns[:, None] * sgn + jrow * sgt + cols[None, :] * sgd, mask=m, other=0.0)
        if jrow < P:
            if NEED_POS:
                acc_pos += tl.sum(g.to(tl.float32), axis=0)
            if NEED_X:
                tl.store(gx_ptr + (ns[:, None] * T_in + jrow) * D + cols[None, :], g.to(gx_ptr.dtype.element_ty),
                         mask=m)
        else:
            r = tl.load(ids_ptr + ns * sin + (jrow - P) * sil, mask=n_ok, other=0).to(tl.int64)  # [BN]
            r_ok = (r >= 0) & (r < L)  # an r outside [0, L) made a NaN row: no input fed it
            keep = r_ok & (r < K)
            if NEED_POS:
                acc_pos += tl.sum(tl.where(r_ok[:, None], g.to(tl.float32), 0.0), axis=0)
            if NEED_X:
                tl.store(gx_ptr + (ns[:, None] * T_in + P + r[:, None]) * D + cols[None, :],
                         g.to(gx_ptr.dtype.element_ty), mask=m & keep[:, None])
            if NEED_MASK:
                acc_mask += tl.sum(tl.where((r_ok & ~keep)[:, None], g.to(tl.float32), 0.0), axis=0)
    if NEED_POS:
        tl.store(ppos_ptr + (s.to(tl.int64) * (P + L) + jrow) * D + cols, acc_pos, mask=col_ok)
    if NEED_MASK:
        if jrow >= P:
            tl.store(pmask_ptr + (s.to(tl.int64) * L + (jrow - P)) * D + cols, acc_mask, mask=col_ok)


@triton.jit
def unshuffle_tokens_fix_kernel(
    ids_ptr, code_ptr, nxt_ptr, g_ptr, gx_ptr,
    L, P, K, D,
    sgn, sgt, sgd,
    sin, sil,
    BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per sample n, after ``unshuffle_tokens_bwd_kernel``: the inverse map of ids_restore[n]
    (scratch code [N, L], nxt [N, L]); unless the row is a permutation, grad_x[n, P + r] for every kept
    r < K is rewritten as the sum of grad rows P + l over the l with ids_restore[n, l] == r (zero if none)."""
    n = tl.program_id(0).to(tl.int64)
    flags = build_map(ids_ptr, code_ptr, nxt_ptr, n, L, L, sin, sil, BLOCK_K=BLOCK_K, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C)
    if flags > 0:
        tl.debug_barrier()
        T_in = P + K
        for r0 in range(0, K, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < K
            code = tl.load(code_ptr + n * L + r, mask=r_ok, other=2147483647, volatile=True)  # [BR]
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                l, hit, nl = first_and_chain(code, nxt_ptr + n * L, r_ok)
                acc = tl.load(g_ptr + n * sgn + (P + l)[:, None] * sgt + cols[None, :] * sgd,
                              mask=hit[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                while tl.max(nl, axis=0) >= 0:
                    more = nl >= 0
                    l2 = nl.to(tl.int64)
                    acc += tl.load(g_ptr + n * sgn + (P + l2)[:, None] * sgt + cols[None, :] * sgd,
                                   mask=more[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                    nl = tl.load(nxt_ptr + n * L + l2, mask=more, other=-1)
                tl.store(gx_ptr + (n * T_in + P + r.to(tl.int64))[:, None] * D + cols[None, :],
                         acc.to(gx_ptr.dtype.element_ty), mask=r_ok[:, None] & col_ok[None, :])
