"""Triton kernels: the residual add with the branch's bias (a block's last add), and its backward.

Forward:  out = s + branch + bias               fp32 math, out in s's dtype (the residual stream)
Backward: dbranch = dout in the branch's dtype; partial sums of dout over the program's rows (the bias
          gradient), fp32 [G, D]; the gradient of s is dout itself (nothing to compute).
Programs: (row group, column block); each walks its rows BLOCK_R at a time. Row offsets are int64.
"""
import triton
import triton.language as tl


@triton.jit
def residual_add_fwd_kernel(
    s_ptr, br_ptr, b_ptr, out_ptr, R, D, ss, sbr, ROWS,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = tl.program_id(0).to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows = first + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        m = ((rows < R) & (r0 + tl.arange(0, BLOCK_R) < ROWS))[:, None] & col_ok[None, :]
        v = tl.load(s_ptr + rows[:, None] * ss + cols[None, :], mask=m, other=0.0).to(tl.float32)
        v += tl.load(br_ptr + rows[:, None] * sbr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += b[None, :]
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def residual_add_bwd_kernel(
    dout_ptr, dbr_ptr, part_ptr, R, D, sd, ROWS,
    STORE_DBR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS
    for r0 in range(0, ROWS, BLOCK_R):
        rows = first + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        m = ((rows < R) & (r0 + tl.arange(0, BLOCK_R) < ROWS))[:, None] & col_ok[None, :]
        g = tl.load(dout_ptr + rows[:, None] * sd + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if STORE_DBR:
            tl.store(dbr_ptr + rows[:, None] * D + cols[None, :], g.to(dbr_ptr.dtype.element_ty), mask=m)
        acc += tl.sum(g, axis=0)
    tl.store(part_ptr + pid.to(tl.int64) * D + cols, acc, mask=col_ok)
