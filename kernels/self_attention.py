"""Triton kernel of self_attention's backward: dq, dk, dv [B, H, N, hd] (any strides) written straight into
the packed gradient of the qkv projection's output, dqkv [B*N, 3*H*hd] (column (part, head, j), the layout
of qkv = x @ W_qkv^T), with the partial column sums of the qkv bias gradient in the same pass.

One program per (row group, head, part): it walks its rows BLOCK_R at a time and writes fp32 partial sums
[G, 3*H*hd] that the caller adds in a fixed order (deterministic). Offsets are int64.
"""
import triton
import triton.language as tl

from ._tiles import row_tile


@triton.jit
def pack_qkv_grad_kernel(
    dq_ptr, dk_ptr, dv_ptr, out_ptr, part_ptr,
    R, N, H, HD, ROWS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    NEED_PART: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)
    if part == 0:
        src, sb, sh, sn, sd = dq_ptr, sqb, sqh, sqn, sqd
    elif part == 1:
        src, sb, sh, sn, sd = dk_ptr, skb, skh, skn, skd
    else:
        src, sb, sh, sn, sd = dv_ptr, svb, svh, svn, svd
    j = tl.arange(0, BLOCK_HD)
    j_ok = j < HD
    D = H * HD
    col = part * D + h * HD + j  # [BLOCK_HD] column of dqkv
    acc = tl.zeros([BLOCK_HD], dtype=tl.float32)
    first = g.to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows, m = row_tile(first, r0, R, ROWS, BLOCK_R, j_ok)  # [BLOCK_R] = b * N + n
        b = rows // N
        n = rows % N
        v = tl.load(src + (b * sb + h * sh + n * sn)[:, None] + j[None, :] * sd, mask=m, other=0.0)
        tl.store(out_ptr + rows[:, None] * (3 * D) + col[None, :], v.to(out_ptr.dtype.element_ty), mask=m)
        if NEED_PART:
            acc += tl.sum(v.to(tl.float32), axis=0)
    if NEED_PART:
        tl.store(part_ptr + g.to(tl.int64) * (3 * D) + col, acc, mask=j_ok)
