"""Tile helpers shared by the Triton kernels.

The row kernels (bias_gelu, residual_add, self_attention's qkv-gradient pack) give each program ``ROWS``
consecutive rows of an [R, D] tensor and walk them ``BLOCK_R`` at a time: :func:`row_tile` is one step of
that walk, :func:`load_rows` / :func:`store_rows` move its tiles. The token kernels' forwards (gather_tokens,
gather_patches, unshuffle_tokens) write rows named by an index tensor: :func:`indexed_rows`.
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


@triton.jit
def indexed_rows(ids_ptr, s_n, s_k, R, T, P, L, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows (program axis 0) of an output of R = N*T rows, row n*T + j being prefix row
    j for j < P and else the row that ids[n, j - P] names: (rows int64, row_ok, n, j, is_id, idx int64,
    idx_ok). is_id: the row takes an id; idx: that id (0 elsewhere); idx_ok: it is in [0, L) (an id outside
    names no row: the caller writes NaN there)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    n = rows // T
    j = rows % T
    is_id = row_ok & (j >= P)
    idx = tl.load(ids_ptr + n * s_n + tl.where(is_id, j - P, 0) * s_k, mask=is_id, other=0).to(tl.int64)
    return rows, row_ok, n, j, is_id, idx, (idx >= 0) & (idx < L)
