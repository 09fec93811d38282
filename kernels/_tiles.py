"""Tile helpers shared by the row kernels (bias_gelu, residual_add, self_attention's qkv-gradient pack).

Those kernels give each program ``ROWS`` consecutive rows of an [R, D] tensor and walk them ``BLOCK_R`` at a
time: :func:`row_tile` is one step of that walk, :func:`load_rows` / :func:`store_rows` move its tiles.
"""
import triton
import triton.language as tl


@triton.jit
def column_block(BLOCK: tl.constexpr, D):
    """(cols [BLOCK], ok [BLOCK]): the columns of this program's column block (program axis 1) of D."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return cols, cols < D


@triton.jit
def row_tile(first, r0, R, ROWS, BLOCK_R: tl.constexpr, col_ok):
    """(rows [BLOCK_R] int64, mask [BLOCK_R, BLOCK]): the rows first + r0 + [0, BLOCK_R) of a program's ROWS
    rows starting at ``first``, and the tile's mask: rows inside both R and the program's share, by col_ok."""
    offs = tl.arange(0, BLOCK_R)
    rows = first + r0 + offs.to(tl.int64)
    return rows, ((rows < R) & (r0 + offs < ROWS))[:, None] & col_ok[None, :]


@triton.jit
def load_rows(ptr, rows, cols, stride, m):
    """The tile ptr[rows, cols] (row stride ``stride``, unit column stride) in fp32, 0 outside the mask m."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, rows, cols, stride, v, m):
    """Store the tile v at ptr[rows, cols] in ptr's dtype, inside the mask m."""
    tl.store(ptr + rows[:, None] * stride + cols[None, :], v.to(ptr.dtype.element_ty), mask=m)
