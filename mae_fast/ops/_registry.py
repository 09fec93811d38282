"""The per-op pattern, written once: which path an op takes, how its kernels are registered, and how
autograd calls them. docs/OPS.md says why.

- :func:`kernel` registers a forward or backward entry point as ``torch.ops.mae_fast.<name>``
  (a ``torch.library.triton_op``, so torch.compile sees the Triton kernels inside). Its body picks the
  Triton kernels or the plain torch implementation with :func:`use_triton`.
- Each public op is a ``torch.autograd.Function`` whose forward and backward call such entry points.
  Eagerly they are called directly, skipping the dispatcher; while torch.compile traces, or while any
  TorchDispatchMode is active (FakeTensorMode, FlopCounterMode, a tracer), through the registered op, so
  the tracer sees one op.
- :func:`path` / :func:`set_path` choose the path for every op: ``"auto"`` (CUDA tensors run Triton, CPU
  tensors the torch path, or Triton's interpreter under ``TRITON_INTERPRET=1``), ``"torch"`` (the plain
  torch path everywhere, e.g. to compare on a GPU) or ``"triton"`` (Triton or an error, never the torch
  path).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Sequence

import torch
from torch._C import _functions as _autograd_functions
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

PATHS = ("auto", "torch", "triton")
_path = "auto"


def triton_interpret() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_path(name: str) -> None:
    """Choose the path of every Triton-backed op: "auto" (default), "torch" or "triton"."""
    global _path
    if name not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {name!r}")
    _path = name


def get_path() -> str:
    return _path


@contextlib.contextmanager
def path(name: str) -> Iterator[None]:
    """Context manager: run the ops inside on path ``name`` (see :func:`set_path`)."""
    old = get_path()
    set_path(name)
    try:
        yield
    finally:
        set_path(old)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs its Triton kernels (see the module docstring). float64 always
    takes the torch path: the kernels compute in fp32."""
    runnable = t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpret())
    if _path == "torch":
        return False
    if _path == "triton" and t.dtype == torch.float64:
        raise RuntimeError("mae_fast.ops path 'triton': the kernels have no float64 version (path 'auto' runs "
                           "float64 on the torch path)")
    if _path == "triton" and not runnable and t.device.type != "meta":
        raise RuntimeError(f"mae_fast.ops path 'triton' needs CUDA tensors or TRITON_INTERPRET=1 on the CPU, "
                           f"got a tensor on {t.device}")
    return runnable and t.dtype != torch.float64


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in the dtype the torch paths compute in: float64 stays float64, anything else becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [R, D] with a unit last stride (a view when possible): the layout of the row kernels."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def dispatching() -> bool:
    """True when an op must go through the dispatcher: torch.compile traces, or a TorchDispatchMode is on."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


class Kernel:
    """A registered entry point: ``torch.ops.mae_fast.<name>``, called directly when nothing traces."""

    def __init__(self, fn: Callable, name: str, mutates_args: Sequence[str]):
        self.fn = fn
        self.name = name
        self.op = torch.library.triton_op(f"mae_fast::{name}", fn, mutates_args=tuple(mutates_args))

    def __call__(self, *args):
        if dispatching():
            return self.op(*args)
        if torch.autograd.profiler._is_profiler_enabled:  # a named range for the profiler, as the op would have
            with torch.autograd.profiler.record_function(f"mae_fast::{self.name}"):
                return self.fn(*args)
        return self.fn(*args)


def kernel(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Kernel]:
    """Decorator: register ``fn`` (type-annotated, its schema is inferred) as ``mae_fast::<name>``."""
    return lambda fn: Kernel(fn, name, mutates_args)


def once_differentiable(op: str):
    """Decorator of an autograd.Function's backward that is not itself differentiable (``op`` names it).

    The backward runs without grad. Under ``create_graph=True`` (grad mode on in the backward) every
    gradient it returns is marked so that differentiating it raises an error naming the op, even when
    the incoming gradient needs no grad (torch's ``once_differentiable`` then returns a gradient without a
    graph, which a gradient penalty would silently treat as a constant).
    """
    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            outs = out if isinstance(out, tuple) else (out,)
            msg = (f"mae_fast.ops.{op}: its backward is not differentiable (double backward, e.g. create_graph=True "
                   f"for a gradient penalty, is not supported)")
            err = _autograd_functions.DelayedError(msg.encode(), len(outs))
            marked = err(*[None if g is None else g.detach().requires_grad_(True) for g in outs])
            marked = marked if isinstance(marked, tuple) else (marked,)
            return marked if isinstance(out, tuple) else marked[0]
        return wrapper
    return wrap


_observers: list = []  # (callback, run): run False records the launch without running it


class _Launch:
    """``launch(kernel)[grid](*args, **kwargs)``: the kernel through ``torch.library.wrap_triton`` (traceable
    inside a registered op, a plain launch otherwise), seen first by the observers of :func:`observe_launches`."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            for observe, _ in _observers:
                observe(self.fn, grid, args, kwargs)
            if all(execute for _, execute in _observers):
                torch.library.wrap_triton(self.fn)[grid](*args, **kwargs)
        return run


def launch(fn) -> _Launch:
    return _Launch(fn)


@contextlib.contextmanager
def observe_launches(run: bool = True):
    """Context manager yielding a list that collects (kernel, grid, args, kwargs) of every launch inside;
    ``run=False`` records the launches without running them (shapes and configurations only, e.g. on fake
    tensors)."""
    seen: list = []
    entry = (lambda *launch_args: seen.append(launch_args), run)
    _observers.append(entry)
    try:
        yield seen
    finally:
        _observers.remove(entry)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def no_grad_placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward kernel returns for a gradient nobody needs: a fresh empty fp32 tensor (registered
    ops return tensors, and outputs never alias)."""
    return torch.empty((0,), dtype=torch.float32, device=like.device)


def unused_pointer(like: torch.Tensor) -> torch.Tensor:
    """A 1-element stand-in for a pointer argument a kernel variant never touches."""
    return torch.empty((1,), dtype=like.dtype, device=like.device)


def autocast_off(t: torch.Tensor):
    """A context without autocast on ``t``'s device: ops choose their dtypes themselves."""
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(t: torch.Tensor):
    """The autocast dtype on ``t``'s device, or None when autocast is off there."""
    kind = t.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None
