"""Attention with a selectable backend: SDPA's flash / cuDNN / efficient / math kernels, or xformers.

``attn_backend`` is chosen per module (``Attention(..., attn_backend="flash")``) or globally
(:func:`set_attn_backend`); ``None`` on a module means "use the global setting", whose default is
``"auto"``. Asking for a backend that cannot run is an error, never a silent fallback.

"auto" is a fixed rule, not a run-time search (so it is free, deterministic and compiles):
- CPU: SDPA's own choice (its flash CPU kernel, or math);
- CUDA: the rule in :func:`auto_backend`. bench/bench_attention.py times every backend on the MAE
  shapes: head dims 32 (decoder) and 64-80 (encoders), sequence lengths such as 50 and 197 that are
  not multiples of 128.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "xformers")
_SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_CPU_BACKENDS = ("auto", "flash", "math")

_global_backend = "auto"


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


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise RuntimeError(
            "attn_backend='xformers' needs the xformers package (pip install mae_fast[xformers]); "
            f"it is not importable here: {e}"
        ) from e
    return xops


def auto_backend(q: torch.Tensor) -> Optional[str]:
    """The backend "auto" uses for ``q`` [B, H, N, hd]; None means SDPA's own dispatch.

    CUDA half precision: SDPA's flash kernel (FlashAttention-2). fp32 has no flash kernel, so SDPA
    chooses. CPU: SDPA chooses. bench/bench_attention.py times every backend on the MAE shapes.
    """
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return "flash"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v [B, H, N, hd] through the chosen backend -> [B, H, N, hd]."""
    name = _check_name(backend if backend is not None else _global_backend)
    if name == "auto":
        name = auto_backend(q)
        if name is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    xops = _xformers_ops() if name == "xformers" else None  # a missing package is said first
    if q.device.type == "cpu" and name not in _CPU_BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not available on CPU; use one of {_CPU_BACKENDS}")
    if xops is not None:
        out = xops.memory_efficient_attention(  # xformers takes [B, N, H, hd]
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p, scale=scale
        )
        return out.transpose(1, 2)  # [B, H, N, hd]
    with sdpa_kernel(_SDPA[name]):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
