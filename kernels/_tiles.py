"""Tile helpers shared by the row kernels (bias_gelu, residual_add, self_attention's qkv-gradient pack).

Those kernels give each program ``ROWS`` consecutive rows of an [R, D] tensor and walk them ``BLOCK_R`` at a
time: :func:`row_tile` is one step of that walk.
"""
import triton
import triton.language as tl


@triton.jit
def row_tile(first, r0, R, ROWS, BLOCK_R: tl.constexpr):
    """(rows [BLOCK_R] int64, ok [BLOCK_R]): the rows first + r0 + [0, BLOCK_R) of a program's ROWS rows
    starting at ``first``, and which of them exist (inside both R and the program's share)."""
    offs = tl.arange(0, BLOCK_R)
    rows = first + r0 + offs.to(tl.int64)
    return rows, (rows < R) & (r0 + offs < ROWS)
