"""Index tensors a user passes: the inverse map the Triton backwards read, and the plain torch helpers
that give the torch path the same meaning for any values (kernels: ``kernels/index_map.py``).

The meaning, on every path: an index outside its range names no row, so the output row it would fill is
NaN (and no gradient flows through it); an index named twice is read twice, and its gradient is the sum
(what torch.gather's gradient is). With the index checks on, such ids are an error instead
(``_checks.check_indices_enabled``).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from mae_fast.kernels import index_map as _k

from ._triton import launch


def index_map(ids: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """ids [N, K] (any values) -> (code [N, L] int32, nxt [N, max(K, 1)] int32), see ``kernels/index_map.py``."""
    N, K = ids.shape
    code = torch.empty((N, L), dtype=torch.int32, device=ids.device)  # [N, L]
    nxt = torch.empty((N, max(K, 1)), dtype=torch.int32, device=ids.device)  # [N, K]
    if N and L:
        launch(_k.index_map_kernel)[(N,)](
            ids, code, nxt, K, L, ids.stride(0), ids.stride(1),
            BLOCK_K=min(1024, triton.next_power_of_2(max(K, 1))), BLOCK_L=min(1024, triton.next_power_of_2(L)),
            BLOCK_C=min(64, triton.next_power_of_2(max(K, 1))), num_warps=4,
        )
    return code, nxt


def valid_and_clamped(ids: Tensor, L: int) -> tuple[Tensor, Tensor, bool]:
    """(valid [N, K] bool: 0 <= id < L, ids clamped into [0, L) as int64, whether every id is valid).

    The last is known without a device sync only for real CPU tensors; elsewhere (CUDA, fake or functional
    tensors while tracing) it is False and the caller masks."""
    idx = ids.long()
    valid = (idx >= 0) & (idx < L)
    real_cpu = ids.device.type == "cpu" and type(ids) is torch.Tensor and not torch.compiler.is_compiling()
    all_valid = real_cpu and bool(valid.all())
    return valid, (idx if all_valid else idx.clamp(0, max(L - 1, 0))), all_valid


def poison_rows(out: Tensor, valid: Tensor, all_valid: bool) -> Tensor:
    """out [N, K, D] with the rows of invalid ids set to NaN (in place on out, which the caller owns)."""
    return out if all_valid else out.masked_fill_(~valid.unsqueeze(-1), float("nan"))
