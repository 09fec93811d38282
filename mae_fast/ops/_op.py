"""Registering an op's forward or backward entry point as ``torch.ops.mae_fast.<name>``.

:func:`register_op` makes the function a ``torch.library.triton_op`` (so torch.compile sees the Triton kernels
inside, and fake tensors get shapes without running them). Eagerly the function is called directly,
skipping the dispatcher (its cost is host time on every call); while something traces
(:func:`mae_fast.ops.paths.dispatching`) the registered op is called, so the tracer sees one op.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .paths import dispatching


class RegisteredOp:
    """An entry point registered as ``torch.ops.mae_fast.<name>``, called directly when nothing traces."""

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


def register_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], RegisteredOp]:
    """Decorator: register ``fn`` (type-annotated, its schema is inferred) as ``mae_fast::<name>``."""
    return lambda fn: RegisteredOp(fn, name, mutates_args)
