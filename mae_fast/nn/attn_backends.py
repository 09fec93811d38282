"""Attention with a selectable backend: SDPA's flash / cuDNN / efficient / math kernels, xformers, or
mae_fast's own kernels for short sequences (``"mae_fast"``: :mod:`mae_fast.ops.qkv_attention`, no dropout).

``attn_backend`` is chosen per module (``Attention(..., attn_backend="flash")``) or globally
(:func:`set_attn_backend`); ``None`` on a module means "use the global setting", whose default is
``"auto"``. Asking for a backend that cannot run is an error, never a silent fallback.

"auto" measures. The first time a shape is seen (device, dtype, B, H, Nq, Nk, head dim, scale,
dropout on/off, forward-only or forward+backward, deterministic mode, strides), :func:`tune` runs
every backend that exists on the device on random inputs of that shape and memory layout, drops the
ones that fail or whose output or gradients disagree with an fp32 math oracle (checked on a slice of
the batch), times the rest (forward, plus backward when autograd will need it) and keeps the fastest. The choice is
cached for the process (:func:`attn_autotune_results`). The MAE shapes are exactly where this
matters: head dim 32 in the decoder and 64-80 in the encoders, sequence lengths such as 50 and 197
that are not multiples of 128, where some backends have had bugs.

Tuning uses its own generator (the global RNG is untouched), runs with autocast off, and never runs
while torch.compile traces or a CUDA graph captures: there the cached choice is used, or the fixed
rule :func:`auto_backend` when the shape has not been tuned (a compiled model bakes the choice in at
trace time). ``MAE_FAST_ATTN_AUTOTUNE=0`` or ``set_attn_autotune(False)`` use the fixed rule only.
Two processes (say two DDP ranks) may pick different backends when their timings are close; all are
checked correct, but pin a backend (``set_attn_backend("flash")``) for bitwise-reproducible runs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import timing
from ..testing import rel_err


BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "xformers", "mae_fast")
_SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_CPU_BACKENDS = ("auto", "flash", "math", "mae_fast")
SDPA_DEFAULT = "sdpa"  # the name "auto" records when it leaves the choice to SDPA's own dispatch

# a backend is "correct" when its relative error (norm) against fp32 math stays under this
_TUNE_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 5e-3, torch.float64: 1e-6}
_TUNE_CHECK_BATCH = 4  # batch entries used for the correctness check (the timing uses the full shape)

_log = logging.getLogger(__name__)
_global_backend = "auto"
_autotune: Optional[bool] = None  # None: follow MAE_FAST_ATTN_AUTOTUNE (default on)
_TUNED: Dict[str, dict] = {}


def _check_name(name: str, arg: str = "attn_backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {name!r}")
    return name


def set_attn_backend(name: str) -> None:
    """Set the backend used by every module whose ``attn_backend`` is None."""
    global _global_backend
    if name == "xformers":
        _xformers_ops()  # fail now, not at the first forward
    _global_backend = _check_name(name)


def get_attn_backend() -> str:
    return _global_backend


@contextlib.contextmanager
def attn_backend(name: str):
    """Context manager: use ``name`` as the global backend inside the block."""
    old = get_attn_backend()
    set_attn_backend(name)
    try:
        yield
    finally:
        set_attn_backend(old)


def set_attn_autotune(enabled: Optional[bool]) -> None:
    """Turn the measuring "auto" on or off (None: follow ``MAE_FAST_ATTN_AUTOTUNE``, default on)."""
    global _autotune
    _autotune = None if enabled is None else bool(enabled)


def attn_autotune_enabled() -> bool:
    if _autotune is not None:
        return _autotune
    return os.environ.get("MAE_FAST_ATTN_AUTOTUNE", "1") != "0"


def attn_autotune_results() -> Dict[str, dict]:
    """What "auto" measured so far: shape key -> {backend, times_ms, rejected}."""
    return {k: {**v, "times_ms": dict(v["times_ms"]), "rejected": dict(v["rejected"])} for k, v in _TUNED.items()}


def clear_attn_autotune() -> None:
    """Forget every measured choice (the next call of each shape measures again)."""
    _TUNED.clear()


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise RuntimeError(
            "attn_backend='xformers' needs the xformers package (pip install mae_fast[xformers]); "
            f"it is not importable here: {e}"
        ) from e
    return xops


def _xformers_available() -> bool:
    try:
        _xformers_ops()
    except RuntimeError:
        return False
    return True


def auto_backend(q: torch.Tensor, dropout_p: float = 0.0) -> Optional[str]:
    """The fixed rule "auto" falls back on when it cannot measure; None means SDPA's own dispatch.

    CUDA half precision: mae_fast's kernels (built for MAE's short sequences) at head dims 32-128 without
    dropout, else SDPA's flash kernel (FlashAttention-2) up to head dim 256. fp32 has no flash kernel, so SDPA
    chooses. CPU: SDPA chooses. Where "auto" measures (the default), the measurement decides instead.
    """
    # a fake tensor stands for a CUDA one (tracing tools see what a GPU run executes); under torch.compile every
    # tensor is fake and the device says where the compiled code runs
    cuda = q.device.type == "cuda" or (not torch.compiler.is_compiling() and is_fake(q))
    if cuda and q.dtype in (torch.float16, torch.bfloat16):
        if 32 <= q.shape[-1] <= 128 and dropout_p == 0.0:
            return "mae_fast"
        if q.shape[-1] <= 256:
            return "flash"
    return None


def candidates(device: torch.device) -> List[str]:
    """The backends "auto" tries on ``device`` (math last: the slowest, but it always runs). mae_fast's
    kernels only on CUDA (on the CPU they are Triton's interpreter or their torch path, never the fastest)."""
    if torch.device(device).type == "cpu":
        return ["flash", "math"]
    names = ["flash", "cudnn", "efficient", "mae_fast"]
    if _xformers_available():
        names.append("xformers")
    return names + ["math"]


def _run(name: str, q, k, v, dropout_p: float, scale: Optional[float]) -> torch.Tensor:
    """One explicitly named backend (not "auto"); [B, H, N, hd] in and out."""
    if name == SDPA_DEFAULT:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    xops = _xformers_ops() if name == "xformers" else None  # a missing package is said first
    if q.device.type == "cpu" and name not in _CPU_BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not available on CPU; use one of {_CPU_BACKENDS}")
    if name == "mae_fast":
        from ..ops.qkv_attention import attention as fast_attention, check_no_dropout

        check_no_dropout(dropout_p)
        return fast_attention(q, k, v, scale)
    if xops is not None:
        out = xops.memory_efficient_attention(  # xformers takes [B, N, H, hd]
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)  # [B, H, N, hd]
    with sdpa_kernel(_SDPA[name]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _strides(t: torch.Tensor) -> str:
    s = t.stride()  # q, k, v are [B, H, N, hd]; formatted int by int so torch.compile can fold it
    return f"{s[0]},{s[1]},{s[2]},{s[3]}"


def _tune_key(q, k, v, dropout_p: float, scale: Optional[float], grad: bool) -> str:
    B, H, Nq, hd = q.shape
    return (f"{q.device}|{str(q.dtype).replace('torch.', '')}|B={B}|H={H}|Nq={Nq}|Nk={k.shape[-2]}|hd={hd}"
            f"|vd={v.shape[-1]}|scale={scale}|dropout={dropout_p > 0}|{'fwd+bwd' if grad else 'fwd'}"
            f"|strides={_strides(q)};{_strides(k)};{_strides(v)}"
            f"|deterministic={torch.are_deterministic_algorithms_enabled()}")


def _why(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"unavailable: {type(e).__name__}: {first}"


def _try_backend(name: str, full, g_out, ref, b: int, dropout_p: float, scale, grad: bool, tol: float,
                 warmup: int, reps: int):
    """(milliseconds, None) for a backend that runs correctly, else (None, why it was not chosen)."""
    ref_out, ref_grads = ref
    try:
        xs = [t[:b].clone().requires_grad_(grad) for t in full]
        out = _run(name, *xs, 0.0, scale)
        errs = [rel_err(out, ref_out)]
        if grad:
            grads = torch.autograd.grad(out, xs, g_out[:b], allow_unused=True)
            errs += [rel_err(torch.zeros_like(x) if a is None else a, r) for a, x, r in zip(grads, xs, ref_grads)]
    except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape is simply not chosen
        return None, _why(e)
    worst = next((e for e in errs if not e <= tol), None)  # a NaN error (non-finite output) fails too
    if worst is not None:
        return None, f"incorrect: relative error {worst:.3g} > {tol:g} against fp32 math"
    xs = [t.detach().requires_grad_(grad) for t in full]  # the real call's strides

    def step():
        out = _run(name, *xs, dropout_p, scale)
        if grad:
            torch.autograd.grad(out, xs, g_out)

    try:
        with torch.random.fork_rng(devices=[full[0].device] if full[0].device.type == "cuda" else []):
            return timing.median_ms(step, full[0].device, warmup, reps), None
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at the full shape, or no dropout support
        return None, _why(e)


def tune(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
         scale: Optional[float] = None, grad: bool = True, warmup: int = 2, reps: int = 5,
         names: Optional[List[str]] = None) -> dict:
    """Measure the backends on inputs shaped like q, k, v and return {backend, times_ms, rejected}.

    The values of q, k, v are not used (random inputs of their shape, dtype and device are); the
    global RNG is untouched. ``grad``: time forward+backward (else forward only). Correctness is
    checked on the first few batch entries against fp32 math, the timing uses the full shape.
    """
    device, dtype = q.device, q.dtype
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def rand_like_layout(t):
        """Random values in t's strides (q, k, v are often views into one qkv buffer; some backends copy
        such inputs, and that cost belongs in the timing); contiguous where the strides overlap."""
        values = rand(t.shape)
        try:
            return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device).copy_(values)
        except RuntimeError:
            return values

    full = [rand_like_layout(t) for t in (q, k, v)]
    g_out = rand(tuple(q.shape[:-1]) + (v.shape[-1],))
    b = min(q.shape[0], _TUNE_CHECK_BATCH)
    small = [t[:b].float().requires_grad_(grad) for t in full]
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = F.scaled_dot_product_attention(*small, scale=scale)  # fp32 oracle on a slice of the batch
    ref_grads = torch.autograd.grad(ref_out, small, g_out[:b].float()) if grad else ()
    tol = _TUNE_TOL.get(dtype, 3e-2)

    times: Dict[str, float] = {}
    rejected: Dict[str, str] = {}
    with warnings.catch_warnings():  # SDPA warns about each kernel it cannot use; the record says why
        warnings.simplefilter("ignore")
        for name in names if names is not None else candidates(device):
            ms, why = _try_backend(name, full, g_out, (ref_out, ref_grads), b, dropout_p, scale, grad, tol,
                                   warmup, reps)
            if why is None:
                times[name] = ms
            else:
                rejected[name] = why
    if not times:
        raise RuntimeError(f"attn_backend='auto': no attention backend runs this shape correctly: {rejected}")
    return {"backend": min(times, key=times.get), "times_ms": times, "rejected": rejected}


@torch.compiler.assume_constant_result
def _choice_while_tracing(key: str, rule: str) -> str:
    """Under torch.compile: the measured choice if there is one, else the rule (baked in, no guard)."""
    entry = _TUNED.get(key)
    return entry["backend"] if entry is not None else rule


def _auto(q, k, v, dropout_p: float, scale: Optional[float]) -> str:
    """The backend "auto" uses for this call (a name from BACKENDS or SDPA_DEFAULT)."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = _tune_key(q, k, v, dropout_p, scale, grad)
    rule = auto_backend(q, dropout_p) or SDPA_DEFAULT
    if torch.compiler.is_compiling():
        return _choice_while_tracing(key, rule)
    entry = _TUNED.get(key)
    if entry is not None:
        return entry["backend"]
    if not attn_autotune_enabled() or (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return rule
    with torch.autocast(q.device.type, enabled=False):
        entry = tune(q, k, v, dropout_p, scale, grad)
    _TUNED[key] = entry
    _log.info("attn_backend='auto' chose %s for %s (ms: %s; rejected: %s)",
              entry["backend"], key, entry["times_ms"], entry["rejected"])
    return entry["backend"]


def resolve_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None,
                    dropout_p: float = 0.0, scale: Optional[float] = None) -> str:
    """The backend :func:`attention` runs for these arguments: a name from BACKENDS other than "auto" (what
    "auto" chose, measuring the shape first if it is new), or SDPA_DEFAULT."""
    name = _check_name(backend if backend is not None else _global_backend)
    return _auto(q, k, v, dropout_p, scale) if name == "auto" else name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v [B, H, N, hd] through the chosen backend -> [B, H, N, hd]."""
    return _run(resolve_backend(q, k, v, backend, dropout_p, scale), q, k, v, dropout_p, scale)
