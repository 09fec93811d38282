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
def _pack_part(src, sb, sh, sn, sd, out_ptr, part_ptr, g, h, R, N, H, HD, ROWS,
               PART: tl.constexpr, NEED_PART: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HD: tl.constexpr):
    """Rows g*ROWS .. of head h of one part (0: dq, 1: dk, 2: dv) into dqkv, and their column sums."""
    j = tl.arange(0, BLOCK_HD)
    j_ok = j < HD
    D = H * HD
    col = PART * D + h * HD + j  # [BLOCK_HD] column of dqkv
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


@triton.jit
def pack_qkv_grad_kernel(
    dq_ptr, dk_ptr, dv_ptr, out_ptr, part_ptr,
    R, N, H, HD, ROWS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    NEED_PART: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    # each part is its own specialisation of _pack_part (PART a constexpr, the source pointer and strides
    # kernel arguments, not a value picked at run time), so each keeps its pointer's alignment and unit
    # stride and its loads vectorise; the branch is uniform per program
    g = tl.program_id(0)
    h = tl.program_id(1)
    part = tl.program_id(2)
    if part == 0:
        _pack_part(dq_ptr, sqb, sqh, sqn, sqd, out_ptr, part_ptr, g, h, R, N, H, HD, ROWS,
                   PART=0, NEED_PART=NEED_PART, BLOCK_R=BLOCK_R, BLOCK_HD=BLOCK_HD)
    elif part == 1:
        _pack_part(dk_ptr, skb, skh, skn, skd, out_ptr, part_ptr, g, h, R, N, H, HD, ROWS,
                   PART=1, NEED_PART=NEED_PART, BLOCK_R=BLOCK_R, BLOCK_HD=BLOCK_HD)
    else:
        _pack_part(dv_ptr, svb, svh, svn, svd, out_ptr, part_ptr, g, h, R, N, H, HD, ROWS,
                   PART=2, NEED_PART=NEED_PART, BLOCK_R=BLOCK_R, BLOCK_HD=BLOCK_HD)
