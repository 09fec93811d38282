"""Where mae_fast decides between its fused ops and the stock modules: one place for every such decision.

- :func:`kernels_apply`: whether the ops run kernels for a tensor at all (CUDA, Triton's interpreter, a path
  chosen with ``mae_fast.ops.path``, or a tracer that should see what a CUDA run executes). On a plain CPU the
  stock modules are faster than the ops' plain torch path (which is there to be the reference).
- :func:`block_reason`: why a block runs module by module (None: it runs through :mod:`mae_fast.nn.fused`);
  :func:`unfused_reason` says that, or which of a fused block's ops run stock and why.
- :func:`run`: one fused op or its stock counterpart (:mod:`mae_fast.nn.stock`), whichever is faster here.
  On CUDA the first call per (op, shapes, dtypes, device, autocast, grad) times both, forward and backward, on
  the call's own inputs (detached; no RNG or gradient of the real step is touched), outside any graph
  capture, checks that the fused result agrees with the stock one, and keeps the faster for the process
  (:func:`fused_choices`). While a tracer runs or a CUDA graph captures, nothing is measured: the cached
  choice, else the fused op. ``MAE_FAST_FUSED=fused|stock|auto`` (default auto) or :func:`set_fused_ops`
  forces one side. Elsewhere (the interpreter, an explicit ops path) the fused ops run: they are what is
  tested there. Each process measures for itself, so DDP ranks whose timings are close may choose differently
  (both sides agree to the check's tolerance); force a side for bitwise-reproducible multi-GPU runs.
- :func:`norm` / :func:`linear`: a model's LayerNorm and Linear through :func:`run` where the ops apply.
- :func:`gemm_dtype`, :func:`is_layer_norm`: the dtype a GEMM runs in, and which norms the fused op replaces.
- ``set_fused_blocks(False)`` turns the fused blocks off everywhere.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .. import ops, timing
from ..testing import rel_err
from . import stock

_enabled = True


def set_fused_blocks(enabled: bool) -> None:
    """Run every standard mae_fast.nn.Block through the fused ops (default) or module by module."""
    global _enabled
    _enabled = bool(enabled)


def fused_blocks_enabled() -> bool:
    return _enabled


def _is_identity(m) -> bool:
    return isinstance(m, nn.Identity) or (getattr(m, "drop_prob", None) == 0.0)


def _inactive_dropout(m, training: bool) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0.0 or not training))


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether blocks, norms and linears go through the fused ops for x: on CUDA, under Triton's
    interpreter, on a path chosen explicitly with ``mae_fast.ops.path``, and under a TorchDispatchMode
    (fake tensors, FlopCounterMode, op tracers), which then sees the ops a CUDA run executes. On a plain
    CPU the stock modules are faster than the ops' plain torch path (which is there to be the reference),
    so they run as they are."""
    return ops.get_path() != "auto" or ops.use_triton(x) or is_in_torch_dispatch_mode()


def block_reason(block, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``block`` runs module by module (None when it runs through the fused ops), for input ``x`` if given."""
    if not _enabled:
        return "fused blocks are turned off (mae_fast.nn.set_fused_blocks(False))"
    if x is not None and (x.dim() != 3 or not x.is_floating_point()):
        return f"input is not a float [B, N, C] tensor (got {x.dim()} dims, {x.dtype})"
    if x is not None and not kernels_apply(x):
        return f"no kernels for {x.device.type} tensors: the stock modules are faster than the ops' torch path"
    if torch.compiler.is_compiling():
        return "torch.compile traces the module-by-module forward and fuses it itself"
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if not is_layer_norm(norm):
            return f"{name} is {type(norm).__name__}, not a LayerNorm over the last dim"
    if not (hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(attn, "num_heads")):
        return "attn is not a qkv/proj attention"
    for name in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(attn, name, nn.Identity())):
            return f"attn.{name} is used"
    if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
        return "attn.qkv / attn.proj are not nn.Linear"
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim or dim % attn.num_heads:
        return "attn's width differs from the block's (attn_head_dim / dim_out)"
    if getattr(attn, "gate", None) is not None:
        return "attn is gated"
    if not isinstance(getattr(attn, "attn_drop", None), (nn.Dropout, nn.Identity)):
        return "attn.attn_drop is not a Dropout"
    for name in ("ls1", "ls2"):
        if not _is_identity(getattr(block, name, nn.Identity())):
            return f"{name} is used"
    for name in ("drop_path1", "drop_path2"):
        if block.training and not _is_identity(getattr(block, name, nn.Identity())):
            return f"{name} is active"
    if not (type(getattr(mlp, "fc1", None)) is nn.Linear and type(getattr(mlp, "fc2", None)) is nn.Linear):
        return "mlp is not an fc1/fc2 MLP"
    if type(getattr(mlp, "act", None)) is not nn.GELU:
        return f"mlp.act is {type(getattr(mlp, 'act', None)).__name__}, not GELU"
    if not _is_identity(getattr(mlp, "norm", nn.Identity())):
        return "mlp.norm is used"
    training = block.training
    for owner, name in ((attn, "proj_drop"), (mlp, "drop1"), (mlp, "drop2"), (mlp, "drop")):
        if not _inactive_dropout(getattr(owner, name, nn.Identity()), training):
            return f"dropout {name} is active"
    return None


def is_layer_norm(m) -> bool:
    """A plain nn.LayerNorm over the last dim: what ops.add_layer_norm computes."""
    return type(m) is nn.LayerNorm and len(m.normalized_shape) == 1


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM consuming x runs in: the autocast dtype on x's device, else x's own."""
    return ops.autocast_dtype(x) or x.dtype


def norm(module: nn.Module, x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A LayerNorm through add_layer_norm (fp32 statistics, output cast once to ``out_dtype``) where the ops run
    kernels, any other norm (or on a plain CPU) as it is."""
    if is_layer_norm(module) and kernels_apply(x):
        out_dtype = out_dtype or x.dtype
        return run("add_layer_norm", x, module.weight, module.bias, module.eps, None, None, out_dtype)[0]
    return module(x)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An nn.Linear through ops.linear (fp32 weight gradient, no per-step casts of it) where the ops run
    kernels, anything else (or on a plain CPU) as it is."""
    if type(module) is nn.Linear and kernels_apply(x):
        return run("linear", x, module.weight, module.bias)
    return module(x)


# --------------------------------------------------------------------------- the measured choice per op
MODES = ("auto", "fused", "stock")
_mode: Optional[str] = None  # None: follow MAE_FAST_FUSED (default auto)
_MEASURED_ON = ("cuda",)  # device types where "auto" measures (elsewhere the fused ops run)
_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 5e-3, torch.float64: 1e-6}
_CHOICES: Dict[str, dict] = {}
_OWNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # block -> {op: choice key}
_log = logging.getLogger(__name__)

# each op's candidates, the fused one first (the default), with one positional signature for both
CANDIDATES: Dict[str, Dict[str, Callable]] = {
    "add_layer_norm": {
        "fused": lambda x, w, b, eps, br, brb, out_dtype: ops.add_layer_norm(x, w, b, eps, branch=br, branch_bias=brb,
                                                                             out_dtype=out_dtype),
        "stock": stock.add_layer_norm},
    "bias_gelu": {"fused": ops.bias_gelu, "stock": stock.bias_gelu},
    "residual_add": {"fused": ops.residual_add, "stock": stock.residual_add},
    "linear": {"fused": ops.linear, "stock": stock.linear},
    "mlp": {  # GEMMs with the bias, GELU and dGELU in their epilogues; or cuBLAS GEMMs around bias_gelu
        "fused": ops.mlp,
        "ops": lambda x, w1, b1, w2, b2, approximate: ops.linear(ops.bias_gelu(ops.linear(x, w1), b1, approximate),
                                                                 w2, b2),
        "stock": stock.mlp},
    "self_attention": {
        "fused": lambda x, w, b, heads, scale, p, backend: ops.self_attention(x, w, b, heads, scale=scale, dropout_p=p,
                                                                             backend=backend),
        "stock": stock.self_attention},
}


def set_fused_ops(mode: Optional[str]) -> None:
    """Force the fused ops ("fused"), the stock modules ("stock"), or measure per shape ("auto"); None
    follows ``MAE_FAST_FUSED`` (default "auto")."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}")
    _mode = mode


def fused_ops_mode() -> str:
    if _mode is not None:
        return _mode
    env = os.environ.get("MAE_FAST_FUSED", "auto")
    if env not in MODES:
        raise ValueError(f"MAE_FAST_FUSED must be one of {MODES}, got {env!r}")
    return env


def fused_choices() -> Dict[str, dict]:
    """What "auto" measured so far: choice key -> {op, path, times_ms, rejected, speedup} (speedup: the stock
    time over the chosen one's; 1.0 when stock was chosen)."""
    return {_describe(k): {**v, "times_ms": dict(v["times_ms"]), "rejected": dict(v["rejected"])}
            for k, v in _CHOICES.items()}


def clear_fused_choices() -> None:
    """Forget every measured choice (the next call of each op and shape measures again)."""
    _CHOICES.clear()


def _key(op: str, device: torch.device, args) -> tuple:
    """What a choice depends on (cheap to build: it is looked up on every call)."""
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return (op, device, amp, torch.is_grad_enabled(),
            *((a.shape, a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args))


def _describe(key: tuple) -> str:
    """A choice key as text: op|device|autocast|grad|arguments (dtype[shape], g: requires grad)."""
    op, device, amp, grad, *args = key
    words = [f"{str(a[1]).replace('torch.', '')}{list(a[0])}{'g' if a[2] else ''}"
             if isinstance(a, tuple) and len(a) == 3 and isinstance(a[0], torch.Size) else repr(a) for a in args]
    return f"{op}|{device}|autocast={str(amp).replace('torch.', '')}|grad={grad}|{','.join(words)}"


def _tensors(out) -> list:
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]


def _measure(op: str, args, device: torch.device) -> dict:
    """Time every candidate of ``op`` on the call's inputs (forward, and backward where autograd will run it),
    after checking it against the stock result; the fastest correct one is chosen."""
    leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args]
    need = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grad = torch.is_grad_enabled() and bool(need)
    gen = torch.Generator(device=device).manual_seed(0)
    g_outs: list = []

    def step(fn):
        outs = [o for o in _tensors(fn(*leaves)) if o.is_floating_point()]
        if not grad:
            return outs, []
        used = [o for o in outs if o.requires_grad]
        while len(g_outs) < len(used):
            o = used[len(g_outs)]
            g_outs.append(torch.randn(o.shape, generator=gen, device=device, dtype=torch.float32).to(o.dtype))
        return outs, list(torch.autograd.grad(used, need, g_outs[:len(used)], allow_unused=True))

    times: Dict[str, float] = {}
    rejected: Dict[str, str] = {}
    dtype = next((t.dtype for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), torch.float32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ref = step(CANDIDATES[op]["stock"])  # the oracle the other candidates are checked against
        for name, fn in CANDIDATES[op].items():
            try:
                if name != "stock":
                    outs, grads = step(fn)
                    errs = [rel_err(a, b) for a, b in zip(outs, ref[0])]
                    errs += [rel_err(a, b) for a, b in zip(grads, ref[1]) if a is not None and b is not None]
                    worst = next((e for e in errs if not e <= _TOL.get(dtype, 3e-2)), None)
                    if worst is not None:
                        rejected[name] = f"incorrect: relative error {worst:.3g} against the stock result"
                        continue
                times[name] = timing.median_ms(lambda: step(fn), device, 2, 5)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run this shape is not chosen
                rejected[name] = f"unavailable: {type(e).__name__}: {str(e).strip()[:200]}"
    if "stock" not in times:
        raise RuntimeError(f"mae_fast: the stock {op} failed on {args!r}: {rejected.get('stock')}")
    path = min(times, key=lambda n: times[n])
    return {"op": op, "path": path, "times_ms": times, "rejected": rejected, "speedup": times["stock"] / times[path]}


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (nothing may be measured then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(op: str, args, owner=None) -> str:
    """The candidate of ``op`` (a name of ``CANDIDATES[op]``: "fused", "stock", or for mlp also "ops") this call
    with these arguments runs (see the module docstring); ``owner``: the block it belongs to (for
    :func:`unfused_reason`)."""
    mode = fused_ops_mode()
    if mode != "auto":
        return mode
    t = args[0]  # every op's first argument is its main input
    if t.device.type not in _MEASURED_ON:
        return "fused"
    key = _key(op, t.device, args)
    if owner is not None:
        _OWNED.setdefault(owner, {})[op] = key
    entry = _CHOICES.get(key)
    if entry is not None:
        return entry["path"]
    if ops.dispatching() or _capturing(t.device):
        return "fused"
    entry = _CHOICES[key] = _measure(op, args, t.device)
    _log.info("mae_fast chose %s for %s (ms: %s; rejected: %s)", entry["path"], _describe(key), entry["times_ms"],
              entry["rejected"])
    return entry["path"]


def run(op: str, *args, owner=None):
    """``op`` on ``args`` through the candidate :func:`choose` picks."""
    return CANDIDATES[op][choose(op, args, owner)](*args)


def unfused_reason(block, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``block`` (for input ``x`` if given) does not run wholly on the fused ops: why it runs module by module
    (:func:`block_reason`), or which of its ops were measured slower than stock here and run stock; None when it
    runs fused."""
    reason = block_reason(block, x)
    if reason is not None:
        return reason
    stocked = []
    for op, key in _OWNED.get(block, {}).items():
        entry = _CHOICES.get(key)
        if entry is not None and entry["path"] == "stock":
            t = entry["times_ms"]
            fused = f"{t['fused']:.3g} ms" if "fused" in t else entry["rejected"].get("fused", "rejected")
            stocked.append(f"{op} (stock {t['stock']:.3g} ms, fused {fused})")
        elif entry is not None and entry["path"] != "fused":
            stocked.append(f"{op} runs {entry['path']} ({', '.join(f'{k} {v:.3g} ms' for k, v in entry['times_ms'].items())})")
    if fused_ops_mode() == "stock":
        return "every fused op runs stock (MAE_FAST_FUSED=stock or set_fused_ops('stock'))"
    if stocked:
        return "runs fused, but these ops were measured faster otherwise here: " + "; ".join(stocked)
    return None
