"""The one timing loop of mae_fast: device time of repeated calls, CUDA events on a GPU (device work is
asynchronous: the events bracket it on the stream), a host clock around each call elsewhere.

Used by the library itself (the attention backend and fused-or-stock choices measure candidates on first
use) and by the tools and bench/ scripts. :class:`StepTimer` times calls one by one (events are read once, at
:meth:`~StepTimer.collect`, so timing adds no sync between calls); :func:`median_ms` and :func:`time_fn` are the
two loops built on it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def quantiles(times_ms: List[float]) -> Dict[str, float]:
    """median, p20 and p80 of ``times_ms`` (and their count)."""
    times_ms = sorted(times_ms)
    if len(times_ms) == 1:
        t = times_ms[0]
        return {"median_ms": t, "p20_ms": t, "p80_ms": t, "n": 1}
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7], "n": len(times_ms)}


class StepTimer:
    """Times calls one at a time: ``with timer: fn()`` per call, then :meth:`collect` for the milliseconds."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list = []
        self.times: List[float] = []

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self.times.append((time.perf_counter() - self._t0) * 1e3)

    def collect(self) -> List[float]:
        """Every call's milliseconds so far (waits for the device once)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self.times.extend(s.elapsed_time(e) for s, e in self._pending)
            self._pending = []
        return self.times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    timer = StepTimer(device)
    for _ in range(reps):
        with timer:
            fn()
    return statistics.median(timer.collect())


def time_fn(fn: Callable[[], object], warmup_ms: float = 50.0, rep_ms: float = 300.0,
            device: Optional[torch.device] = None, min_reps: int = 5, max_reps: int = 1000) -> Dict[str, float]:
    """Time ``fn()``: median, p20 and p80 in milliseconds over repeated calls after a warm-up, the number of
    repetitions chosen so the timed part lasts about ``rep_ms``."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    fn()  # estimate one call, then warm up
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    _sync(device)
    timer = StepTimer(device)
    for _ in range(int(min(max_reps, max(min_reps, rep_ms / est_ms)))):
        with timer:
            fn()
    return quantiles(timer.collect())
