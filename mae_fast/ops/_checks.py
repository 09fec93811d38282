"""Input checks shared by the public ops: each raises TypeError/ValueError naming the argument."""
from __future__ import annotations

import numbers
import os
from typing import Iterable, Optional

import torch

from .paths import dispatching

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_indices_enabled(flag: Optional[bool] = None, device: Optional[torch.device] = None) -> bool:
    """Run the checks that read index values (a device sync on CUDA)? An explicit argument wins, then
    ``MAE_FAST_CHECK_INDICES`` (``1`` on, ``0`` off), then the device: on for CPU tensors (no sync to pay),
    off elsewhere. Never while torch.compile traces or a TorchDispatchMode is on (the values are not there)."""
    if dispatching():
        return False
    if flag is not None:
        return bool(flag)
    env = os.environ.get("MAE_FAST_CHECK_INDICES")
    if env in ("0", "1"):
        return env == "1"
    return device is not None and torch.device(device).type == "cpu"


def _as_python_scalar(value):
    """A 0-d tensor or 0-d numpy value as the Python number it holds; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def check_number(name: str, value, *, minimum: Optional[float] = None) -> float:
    """A real number (Python, numpy, or a 0-d tensor) as a float; TypeError/ValueError naming it."""
    value = _as_python_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if minimum is not None and not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_int(name: str, value, minimum: Optional[int] = None, *, what: Optional[str] = None) -> int:
    """An integer (Python, numpy, or a 0-d integer tensor) as an int; TypeError/ValueError naming it.
    ``what`` replaces "an int" / ">= minimum" in both messages (e.g. "a positive int")."""
    value = _as_python_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what or 'an int'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what or f'>= {minimum}'}, got {value!r}")
    return int(value)


def check_ratio(name: str, value) -> float:
    """A ratio in [0, 1) as a float (Python, numpy, 0-d tensor); TypeError/ValueError naming it."""
    value = check_number(name, value)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _fmt_shape(shape: Iterable) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Validate one argument; raise TypeError/ValueError naming it, the expectation and what came."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {_fmt_shape(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Iterable) -> None:
    """Check ``t.shape`` against ``expected`` (None entries match anything)."""
    expected = tuple(expected)
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        exp = _fmt_shape("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {exp}, got {_fmt_shape(t.shape)}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given (non-None) tensors on one device; return it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {dev}; all inputs must share a device")
    return dev


def check_index_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """Every entry of ``ids`` in [0, upper) (a device sync: only when index checks are on)."""
    if not ids.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} has entries outside [0, {upper}): min {lo}, max {hi}")


def check_distinct_rows(name: str, ids: torch.Tensor, upper: int) -> None:
    """Every row of ``ids`` holds distinct entries of [0, upper) (a device sync)."""
    check_index_range(name, ids, upper)
    srt = torch.sort(ids.long(), dim=1).values  # [N, K]
    if srt.shape[1] > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError(f"{name} rows must hold distinct indices (a repeated index was found)")


def check_permutation_rows(name: str, ids: torch.Tensor) -> None:
    """Every row of ``ids`` [N, L] is a permutation of [0, L) (a device sync)."""
    N, L = ids.shape
    check_index_range(name, ids, L)
    srt = torch.sort(ids.long(), dim=1).values  # [N, L]
    if not torch.equal(srt, torch.arange(L, device=srt.device).expand(N, L)):
        raise ValueError(f"{name} rows must be permutations of [0, L)")


def check_patch_sizes(patch_size, t_patch_size) -> tuple:
    """(patch_size, t_patch_size) as positive ints (Python, numpy or 0-d tensors); TypeError/ValueError naming
    the argument."""
    return (check_int("patch_size", patch_size, 1, what="a positive int"),
            check_int("t_patch_size", t_patch_size, 1, what="a positive int"))


def check_clip_grid(imgs: torch.Tensor, patch_size, t_patch_size) -> tuple:
    """Validate imgs [N, C, H, W] or a video [N, C, T, H, W] against (t_patch_size, patch_size).

    Returns (N, C, T, H, W, L) with T = 1 for an image and L = T/u * H/p * W/p tokens. The sizes may be
    numpy integers or 0-d tensors (:func:`check_patch_sizes`). Raises
    TypeError for a non-int size and ValueError for shapes that do not split into tubelets, naming the
    argument.
    """
    check_tensor("imgs", imgs, dtypes=FLOAT_DTYPES)
    if imgs.dim() not in (4, 5):
        raise ValueError(f"imgs must have 4 dims ([N, C, H, W]) or 5 dims ([N, C, T, H, W]), "
                         f"got shape {_fmt_shape(imgs.shape)}")
    p, u = check_patch_sizes(patch_size, t_patch_size)
    N, C, H, W = imgs.shape[0], imgs.shape[1], imgs.shape[-2], imgs.shape[-1]
    if imgs.dim() == 4 and u != 1:
        raise ValueError(f"t_patch_size must be 1 for 4-D imgs [N, C, H, W], got {u} (pass a video as [N, C, T, H, W])")
    T = imgs.shape[2] if imgs.dim() == 5 else 1
    if T % u or T == 0:
        raise ValueError(f"imgs time size T={T} must be a positive multiple of t_patch_size={u}, "
                         f"got imgs shape {_fmt_shape(imgs.shape)}")
    if H % p or W % p or H == 0 or W == 0:
        raise ValueError(f"imgs height and width must be positive multiples of patch_size={p}, "
                         f"got imgs shape {_fmt_shape(imgs.shape)}")
    if C < 1:
        raise ValueError(f"imgs must have at least one channel, got imgs shape {_fmt_shape(imgs.shape)}")
    return N, C, T, H, W, (T // u) * (H // p) * (W // p)
