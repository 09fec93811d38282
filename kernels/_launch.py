"""Launch configurations shared by the row-copy kernels (gather_tokens, unshuffle_tokens, gather_patches)."""
from typing import NamedTuple

import triton


class RowCopy(NamedTuple):
    """A forward that copies rows: each program moves BLOCK_ROWS rows x BLOCK_COLS columns."""

    block_rows: int
    block_cols: int
    num_warps: int


class ColumnSplit(NamedTuple):
    """An l-major backward: one program per (output row, column block, N split); each split of
    ``chunk_n`` samples writes fp32 partial sums that the caller adds in a fixed order."""

    block_n: int
    block_d: int
    splits: int
    chunk_n: int
    num_warps: int


def row_copy(width: int) -> RowCopy:
    """256-wide column blocks (exact for D = 512/768/1024/1280 and C*p*p = 768) and ~4096 elements per
    program, so several rows each."""
    block = min(256, triton.next_power_of_2(width))
    return RowCopy(max(1, 4096 // block), block, 4)


def column_split(N: int, rows: int, D: int, target_programs: int = 2048) -> ColumnSplit:
    """Enough programs to fill a large GPU: wide column blocks (one or two per row for D <= 2048) keep
    the program count low, and splitting N into chunks restores parallelism."""
    block_d = min(1024, triton.next_power_of_2(D))
    block_n = max(1, min(4096 // block_d, triton.next_power_of_2(max(N, 1))))
    n_blocks = triton.cdiv(max(N, 1), block_n)
    base = rows * triton.cdiv(D, block_d)
    splits = max(1, min(n_blocks, triton.cdiv(target_programs, max(base, 1))))
    chunk = triton.cdiv(n_blocks, splits) * block_n
    splits = triton.cdiv(max(N, 1), chunk)
    return ColumnSplit(block_n, block_d, splits, chunk, 4)
