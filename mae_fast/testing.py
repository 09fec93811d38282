"""Helpers for comparing fast ops against a float64 oracle (used by the tests; public for users)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


def assert_close_to_oracle(
    out: torch.Tensor, exact: torch.Tensor, same_dtype: torch.Tensor, *, atol: float = 0.0, name: str = "out"
) -> None:
    """|out - exact| <= 2 * |same_dtype - exact| + atol, elementwise.

    ``exact``: the float64 oracle; ``same_dtype``: the plain torch implementation run in the
    same dtype as ``out``. The fast op may err at most twice as much as torch itself does.
    """
    o, e, s = (t.detach().double().cpu() for t in (out, exact, same_dtype))
    if o.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(o.shape)} != oracle shape {tuple(e.shape)}")
    if not torch.isfinite(o).all():
        raise AssertionError(f"{name}: non-finite values")
    err = (o - e).abs()
    bound = 2 * (s - e).abs() + atol
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {o.numel()} elements exceed 2*|torch-exact|+{atol}; "
            f"first at flat index {i}: out={o.flatten()[i]:.6g} exact={e.flatten()[i]:.6g} "
            f"torch={s.flatten()[i]:.6g}"
        )
