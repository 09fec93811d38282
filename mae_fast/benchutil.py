"""Measurement helpers shared by `mae-fast bench` and the scripts in bench/.

Honest timing: warm-up excluded, medians with p20/p80, CUDA events on GPU (device work is
asynchronous), a host clock around synchronised calls on CPU. Every result file carries its
provenance (device, versions, commit, command) so anyone can rerun it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def git_commit() -> str:
    """The checkout's commit (+dirty); MAE_FAST_COMMIT overrides it (copies of a tree without git)."""
    if os.environ.get("MAE_FAST_COMMIT"):
        return os.environ["MAE_FAST_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or len(commit) != 40:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> Dict[str, Optional[str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def provenance(argv: Optional[List[str]] = None, device: Optional[torch.device] = None) -> dict:
    """What a result needs to be reproduced: device, versions, commit, command, date."""
    argv = sys.argv if argv is None else argv
    return {
        "device": device_name(device),
        "versions": versions(),
        "commit": git_commit(),
        "command": " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _quantiles(times_ms: List[float]) -> Dict[str, float]:
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
    return _quantiles(times)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup_ms=20, rep_ms=200, device=device)
    return 2 * src.numel() * src.element_size() / (t["median_ms"] * 1e-3)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the folder if needed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")


def _cell(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def format_table(rows: Iterable[dict], columns: List[str]) -> str:
    """A plain aligned text table of ``columns`` from ``rows`` (missing cells are blank)."""
    rows = list(rows)
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


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
