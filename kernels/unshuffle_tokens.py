"""Triton kernels: decoder input in one pass: unshuffle + mask-token fill + position add, and its backward.

Forward:  x [N, P+K, D], ids_restore [N, L], mask_token [1, 1, D] -> out [N, P+L, D]
          out[n, j]   = x[n, j] (+ pos[0, j])                                          (j < P)
          out[n, P+l] = (x[n, P+r] if r < K else mask_token) (+ pos[0, P+l]),  r = ids_restore[n, l]
Backward: l-major: one program per (output position, D block, N split) walks N: grad_x rows are written
          once each (ids_restore is a permutation), the grad pos and grad mask_token sums go to fp32
          per-split partials the caller sums in a fixed order (deterministic, no atomics).
"""
import triton
import triton.language as tl


@triton.jit
def unshuffle_fwd_kernel(
    x_ptr, ids_ptr, mask_ptr, pos_ptr, out_ptr,
    R, T, P, K, D,  # R = N*T output rows, T = P+L
    sxn, sxt, sxd,
    sin, sil,
    smd,
    spt, spd,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] int64
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    row_ok = rows < R
    col_ok = cols < D
    n = rows // T
    j = rows % T
    is_tok = row_ok & (j >= P)
    l = tl.where(is_tok, j - P, 0)
    r = tl.load(ids_ptr + n * sin + l * sil, mask=is_tok, other=0).to(tl.int64)  # [BR]
    from_x = row_ok & ((j < P) | (r < K))
    src = tl.where(j < P, j, P + r)
    v = tl.load(x_ptr + n[:, None] * sxn + src[:, None] * sxt + cols[None, :] * sxd,
                mask=from_x[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    mt = tl.load(mask_ptr + cols * smd, mask=col_ok, other=0.0).to(tl.float32)  # [BD]
    v = tl.where(from_x[:, None], v, mt[None, :])
    if HAS_POS:
        pos = tl.load(pos_ptr + j[:, None] * spt + cols[None, :] * spd,
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        v = v + pos.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def unshuffle_bwd_kernel(
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
        if NEED_POS:
            acc_pos += tl.sum(g.to(tl.float32), axis=0)
        if jrow < P:
            if NEED_X:
                tl.store(gx_ptr + (ns[:, None] * T_in + jrow) * D + cols[None, :], g.to(gx_ptr.dtype.element_ty),
                         mask=m)
        else:
            r = tl.load(ids_ptr + ns * sin + (jrow - P) * sil, mask=n_ok, other=0).to(tl.int64)  # [BN]
            keep = r < K
            if NEED_X:
                tl.store(gx_ptr + (ns[:, None] * T_in + P + r[:, None]) * D + cols[None, :],
                         g.to(gx_ptr.dtype.element_ty), mask=m & keep[:, None])
            if NEED_MASK:
                acc_mask += tl.sum(tl.where(keep[:, None], 0.0, g.to(tl.float32)), axis=0)
    if NEED_POS:
        tl.store(ppos_ptr + (s.to(tl.int64) * (P + L) + jrow) * D + cols, acc_pos, mask=col_ok)
    if NEED_MASK:
        if jrow >= P:
            tl.store(pmask_ptr + (s.to(tl.int64) * L + (jrow - P)) * D + cols, acc_mask, mask=col_ok)
