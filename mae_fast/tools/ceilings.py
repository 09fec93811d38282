"""Measured ceilings of the device (copy bandwidth, matmul rate), for the fractions the tools' results report;
timed with :mod:`mae_fast.timing`."""
from __future__ import annotations

from typing import Optional

import torch

from ..timing import time_fn


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup_ms=20, rep_ms=200, device=device)
    return 2 * src.numel() * src.element_size() / (t["median_ms"] * 1e-3)


def matmul_peak(device, dtype: torch.dtype = torch.bfloat16, n: Optional[int] = None) -> float:
    """Measured matmul throughput in FLOP/s (2 n^3 per product of two n x n matrices).

    The yardstick for MFU when the vendor peak is not given: what this device reaches on a large,
    well-shaped GEMM in ``dtype`` in this run (n = 8192 on CUDA, 1024 on CPU), from the
    timed repetitions' p20 time (closer to what the hardware can sustain than the median, less
    noisy than the minimum).
    """
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype in (torch.float16,):
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=out), warmup_ms=100 if device.type == "cuda" else 20,
                rep_ms=300 if device.type == "cuda" else 200, device=device)
    best_ms = min(t["p20_ms"], t["median_ms"])
    return 2.0 * n**3 / (best_ms * 1e-3)
