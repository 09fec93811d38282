"""Triton kernels: the residual add with the branch's bias (a block's last add), and its backward.

Forward:  out = s + branch + bias               fp32 math, out in s's dtype (the residual stream)
Backward: dbranch = dout in the branch's dtype; partial sums of dout over the program's rows (the bias
          gradient), fp32 [G, D]; the gradient of s is dout itself (nothing to compute).
Programs: (row group, column block); each walks its rows BLOCK_R at a time. Row offsets are int64.
"""
import triton
import triton.language as tl

from ._tiles import column_block, load_rows, row_tile, store_rows


@triton.jit
def residual_add_fwd_kernel(
    s_ptr, br_ptr, b_ptr, out_ptr, R, D, ss, sbr, ROWS,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols, col_ok = column_block(BLOCK_D, D)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0).to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows, m = row_tile(first, r0, R, ROWS, BLOCK_R, col_ok)
        v = load_rows(s_ptr, rows, cols, ss, m)
        v += load_rows(br_ptr, rows, cols, sbr, m)
        if HAS_BIAS:
            v += b[None, :]
        store_rows(out_ptr, rows, cols, D, v, m)


@triton.jit
def residual_add_bwd_kernel(
    dout_ptr, dbr_ptr, part_ptr, R, D, sd, ROWS,
    STORE_DBR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_ok = column_block(BLOCK_D, D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows, m = row_tile(first, r0, R, ROWS, BLOCK_R, col_ok)
        g = load_rows(dout_ptr, rows, cols, sd, m)
        if STORE_DBR:
            store_rows(dbr_ptr, rows, cols, D, g, m)
        acc += tl.sum(g, axis=0)
    tl.store(part_ptr + pid.to(tl.int64) * D + cols, acc, mask=col_ok)
