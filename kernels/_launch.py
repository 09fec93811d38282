"""Launch configurations of the kernels, as named tuples: row copies (gather_tokens, unshuffle_tokens,
gather_patches), their l-major backwards, row reductions (add_layer_norm) and elementwise row tiles (bias_gelu,
residual_add, pack_qkv_grad)."""
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


class RowNorm(NamedTuple):
    """A kernel that reduces whole rows: each program takes ``rows`` rows of one BLOCK_D-wide block."""

    block_d: int
    rows: int
    num_warps: int
    grid: int


class RowChunks(NamedTuple):
    """A kernel that reduces whole rows held as ``chunks`` chunks of BLOCK_D lanes: ``rows`` rows per program."""

    block_d: int
    chunks: int
    rows: int
    num_warps: int
    grid: int


def row_norm(R: int, D: int, rows: int = 4, chunk: int = 256) -> RowChunks:
    """Forward of a per-row reduction: a few rows per program. A row is one power-of-two block of lanes,
    except for a width that is a multiple of ``chunk`` but no power of two (768, 1280): then D / chunk chunks,
    so every lane is used (one block would leave a quarter of them idle at 768, 3/8 at 1280); two warps fill
    a 256-lane chunk of fp32 with 16-byte loads."""
    block = triton.next_power_of_2(max(D, 1))
    grid = max(1, triton.cdiv(R, rows))
    if block != D and D > chunk and D % chunk == 0:
        return RowChunks(chunk, D // chunk, rows, 2, grid)
    return RowChunks(block, 1, rows, 4 if block <= 1024 else 8, grid)


def row_norm_partials(R: int, D: int, max_programs: int = 1024) -> RowNorm:
    """Backward of a per-row reduction that also sums columns over rows: up to ``max_programs`` programs,
    each over a contiguous range of rows, each writing one fp32 partial row per summed vector."""
    block_d = triton.next_power_of_2(max(D, 1))
    rows = max(1, triton.cdiv(R, max_programs))
    return RowNorm(block_d, rows, 4 if block_d <= 1024 else 8, max(1, triton.cdiv(R, rows)))


class RowTiles(NamedTuple):
    """An elementwise kernel over [R, F] that may also sum columns over rows: programs (row group, column
    block), each walking ``rows`` rows (a multiple of block_r) block_r at a time."""

    block_r: int
    block_f: int
    rows: int
    num_warps: int
    grid: tuple


def row_tiles(R: int, F: int, target_programs: int = 2048) -> RowTiles:
    """256-wide column blocks, ~4096 elements per tile, enough row groups to fill a large GPU (each row
    group writes one fp32 partial row when the kernel sums columns)."""
    block_f = min(256, triton.next_power_of_2(max(F, 1)))
    block_r = max(1, min(4096 // block_f, triton.next_power_of_2(max(R, 1))))
    col_blocks = triton.cdiv(max(F, 1), block_f)
    groups = max(1, min(triton.cdiv(max(R, 1), block_r), triton.cdiv(target_programs, col_blocks)))
    rows = triton.cdiv(triton.cdiv(max(R, 1), groups), block_r) * block_r
    return RowTiles(block_r, block_f, rows, 4, (triton.cdiv(max(R, 1), rows), col_blocks))


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
