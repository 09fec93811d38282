"""Helpers for comparing fast ops against a float64 oracle (used by the tests; public for users)."""
from __future__ import annotations

import inspect
from typing import Optional

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on a's device (0 when both are zero; NaN when a is not finite)."""
    a = a.detach().double()
    b = b.detach().double().to(a.device)
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def assert_close_to_oracle(
    out: torch.Tensor, exact: torch.Tensor, same_dtype: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0,
    name: str = "out"
) -> None:
    """|out - exact| <= 2 * |same_dtype - exact| + rtol * |exact| + atol, elementwise.

    ``exact``: the float64 oracle; ``same_dtype``: the plain torch implementation run in the
    same dtype as ``out``. The fast op may err at most twice as much as torch itself does. ``rtol`` of
    ``ULP[dtype]`` allows one rounding step more (Triton's interpreter truncates where a GPU rounds).
    """
    o, e, s = (t.detach().double().cpu() for t in (out, exact, same_dtype))
    if o.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(o.shape)} != oracle shape {tuple(e.shape)}")
    if not torch.isfinite(o).all():
        raise AssertionError(f"{name}: non-finite values")
    err = (o - e).abs()
    bound = 2 * (s - e).abs() + rtol * e.abs() + atol
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {o.numel()} elements exceed 2*|torch-exact|+{atol}; "
            f"first at flat index {i}: out={o.flatten()[i]:.6g} exact={e.flatten()[i]:.6g} "
            f"torch={s.flatten()[i]:.6g}"
        )


def randn(*shape, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Normal values from a seeded generator (the same on every device), then cast."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def random_ids(N: int, L: int, K: int, dtype: torch.dtype = torch.int64, device="cpu", seed: int = 0):
    """(ids_keep [N, K], ids_restore [N, L]) as the official random_masking makes them from uniform noise."""
    g = torch.Generator().manual_seed(seed)
    ids_shuffle = torch.rand(N, L, generator=g).argsort(1)  # [N, L]
    ids_restore = ids_shuffle.argsort(1)  # [N, L]
    return ids_shuffle[:, :K].to(dtype).to(device), ids_restore.to(dtype).to(device)


def _run_with_grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad if isinstance(t, torch.Tensor) and t.is_floating_point() else None for t in leaves]


def assert_norm_close_to_oracle(out: torch.Tensor, exact: torch.Tensor, same_dtype: torch.Tensor, *,
                                rtol: float = 0.0, name: str = "out") -> None:
    """||out - exact|| <= 2 * ||same_dtype - exact|| + rtol * ||exact||: the norm-wise form of
    :func:`assert_close_to_oracle`, for results whose per-element rounding noise is random (low-precision
    sums with cancellation)."""
    o, e, s = (t.detach().double().cpu() for t in (out, exact, same_dtype))
    if not torch.isfinite(o).all():
        raise AssertionError(f"{name}: non-finite values")
    err, ref = (o - e).norm().item(), (s - e).norm().item()
    if err > 2 * ref + rtol * e.norm().item():
        raise AssertionError(f"{name}: error norm {err:.4g} > 2 * torch's {ref:.4g} + {rtol:g} * {e.norm().item():.4g}")


def check_op(fn, oracle, inputs, grad_out: torch.Tensor, *, name: str = "op", rtol: float = None,
             atol: float = 1e-6, elementwise: bool = True) -> None:
    """``fn(*inputs)`` and every gradient of its float inputs against ``oracle`` run in float64 (on the same
    inputs and output gradient, rounded as the op gets them), within twice the error of ``oracle`` run in
    the inputs' own dtype (:func:`assert_close_to_oracle`).

    ``rtol`` defaults to one ulp of each compared tensor's dtype; ``atol`` is scaled by (1 + max |exact|), the fp32
    summation error of reductions taken in another order than torch's. Gradients must come back in their
    input's dtype. ``elementwise=False`` compares norms instead (:func:`assert_norm_close_to_oracle`).
    """
    out, grads = _run_with_grads(fn, inputs, grad_out)
    wide = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    # the exact math of what the op is given: the output gradient as the op receives it (in its dtype)
    exact, grads64 = _run_with_grads(oracle, wide, grad_out.to(out.dtype).double())
    same, grads_same = _run_with_grads(oracle, inputs, grad_out)
    tol = lambda t: ULP[t.dtype] if rtol is None else rtol  # noqa: E731

    def compare(a, e, s, label):
        if elementwise:
            assert_close_to_oracle(a, e, s, rtol=tol(a), atol=atol * (1 + e.abs().max().item()), name=label)
        else:
            assert_norm_close_to_oracle(a, e, s, rtol=tol(a), name=label)

    compare(out, exact, same, f"{name} out")
    for i, (g, g64, gs) in enumerate(zip(grads, grads64, grads_same)):
        if g64 is None:
            continue
        if g is None:
            raise AssertionError(f"{name}: no gradient for input {i}")
        if g.dtype != inputs[i].dtype:
            raise AssertionError(f"{name}: gradient of input {i} is {g.dtype}, the input is {inputs[i].dtype}")
        compare(g, g64, gs, f"{name} grad[{i}]")


def _takes_noise(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "noise" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def assert_same_mae_step(ref, fast, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None, *,
                         seed: int = 0, pred_tol: float = 1e-5, loss_tol: float = 1e-5, grad_tol: float = 1e-4) -> dict:
    """Two MAEs with the official interface agree on one step: same mask, pred and loss (relative
    tolerances) and every parameter's gradient after ``loss.backward()``.

    ``noise`` [N, L]: given to both forwards as ``model(imgs, mask_ratio, noise)``. None: the official
    draw, for a ``ref`` whose forward takes no noise (the official ``models_mae.py``): each forward runs
    right after ``torch.manual_seed(seed)``, ``ref`` as ``ref(imgs, mask_ratio)`` (its random_masking draws
    ``torch.rand(N, L)`` first), ``fast`` with that same draw as its noise. The global RNG state is
    restored afterwards. Returns the reference's gradients by parameter name.
    """
    if noise is None:
        L = fast.patch_embed.num_patches // getattr(fast, "mask_frames", 1)
        devices = [imgs.device] if imgs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            l_ref, p_ref, m_ref = ref(imgs, mask_ratio)
            torch.manual_seed(seed)
            drawn = torch.rand(imgs.shape[0], L, device=imgs.device)  # what the official random_masking draws
            l_fast, p_fast, m_fast = fast(imgs, mask_ratio, drawn)
    else:
        if not _takes_noise(ref):
            raise ValueError(f"noise: ref ({type(ref).__name__}) has a forward without noise; leave noise=None "
                             f"to compare on the official torch.rand draw (seed=)")
        l_ref, p_ref, m_ref = ref(imgs, mask_ratio, noise)
        l_fast, p_fast, m_fast = fast(imgs, mask_ratio, noise)
    if not torch.equal(m_fast, m_ref):
        raise AssertionError("mask differs")
    if rel_err(p_fast, p_ref) >= pred_tol:
        raise AssertionError(f"pred: relative error {rel_err(p_fast, p_ref):.3g} >= {pred_tol}")
    if abs(l_fast.item() - l_ref.item()) > loss_tol * abs(l_ref.item()):
        raise AssertionError(f"loss: {l_fast.item()} vs {l_ref.item()}")
    l_ref.backward()
    l_fast.backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g_fast = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    if set(g_ref) != set(g_fast):
        raise AssertionError(f"parameters with a gradient differ: {sorted(set(g_ref) ^ set(g_fast))}")
    for k in g_ref:
        if rel_err(g_fast[k], g_ref[k]) >= grad_tol:
            raise AssertionError(f"grad of {k}: relative error {rel_err(g_fast[k], g_ref[k]):.3g} >= {grad_tol}")
    return g_ref
