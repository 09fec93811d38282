"""Fixed sin-cos position tables of the MAE (float64 math, float32 result)."""
from __future__ import annotations

from typing import Sequence

import torch


def _table_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim]: [sin(pos * omega), cos(pos * omega)] concatenated, omega_i = 1 / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # [dim/2]
    angle = pos.to(torch.float64)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([angle.sin(), angle.cos()], dim=1)  # [M, dim]


def _table_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """[gh*gw, dim], token = row*gw + col: the column's table on the first half, the row's on the second."""
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # [L]
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)  # [L]
    return torch.cat([_table_1d(dim // 2, cols), _table_1d(dim // 2, rows)], dim=1)  # [L, dim]


def sincos_pos_embed(embed_dim: int, grid: Sequence[int], cls_token: bool = True) -> torch.Tensor:
    """The fixed table [(1 +) L, embed_dim] (float32) for a grid (h, w) or, for video, (t, h, w).

    Image: the official 2-D table (token = row * w + col). Video: tokens (slot, row, col); the first
    4 * (3 * embed_dim // 16) channels hold the 2-D table of (row, col), the rest a 1-D table of the slot.
    The cls row, when asked for, is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a sin-cos table, got {embed_dim}")
    if len(grid) == 2:
        table = _table_2d(embed_dim, *grid)  # [h*w, D]
    else:
        t, gh, gw = grid
        d_space = 4 * (3 * embed_dim // 16)
        space = _table_2d(d_space, gh, gw).repeat(t, 1)  # [t*h*w, d_space]
        time = _table_1d(embed_dim - d_space, torch.arange(t)).repeat_interleave(gh * gw, dim=0)  # [t*h*w, D - ds]
        table = torch.cat([space, time], dim=1)  # [L, D]
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)  # [1+L, D]
    return table.float()
