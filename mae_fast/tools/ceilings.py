"""Honest timing for the tools and bench/: warm-up excluded, medians with p20/p80, CUDA events on a GPU
(device work is asynchronous), a host clock around synchronised calls on a CPU; measured ceilings
(copy bandwidth, matmul rate) for the fractions the results report."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def quantiles(times_ms: List[float]) -> Dict[str, float]:
    times_ms = sorted(times_ms)
    if len(times_ms) == 1:
        t = times_ms[0]
        return {"median_ms": t, "p20_ms": t, "p80_ms": t, "n": 1}
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7], "n": len(times_ms)}


def time_fn(fn: Callable[[], object], warmup_ms: float = 50.0, rep_ms: float = 300.0,
            device: Optional[torch.device] = None, min_reps: int = 5, max_reps: int = 1000) -> Dict[str, float]:
    """Time ``fn()``: median, p20 and p80 in milliseconds over repeated calls after a warm-up.

    On CUDA each call is bracketed by CUDA events; on CPU by perf_counter. The number of
    repetitions is chosen so the timed part lasts about ``rep_ms``.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # estimate one call, then warm up
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    sync()

    reps = int(min(max_reps, max(min_reps, rep_ms / est_ms)))
    times: List[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


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
