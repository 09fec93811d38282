"""Autograd helpers shared by the ops' ``torch.autograd.Function`` classes."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch._C import _functions as _autograd_functions


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
