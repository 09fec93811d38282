"""Autograd helpers shared by the ops' ``torch.autograd.Function`` classes.

The ops' backwards are not differentiable. Each op's Function follows one convention so that any attempt to
differentiate one of its gradients, through any autograd API, raises an error naming the op:

- its forward makes an :func:`anchor`, saves it last (``ctx.save_for_backward(..., anchor)``) and returns it
  as its last output; the public op calls the Function through :func:`apply`, which drops it;
- its backward is decorated with :func:`once_differentiable`, which takes one gradient more (the anchor's,
  unused) and marks every gradient it returns.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch._C import _functions as _autograd_functions


def anchor(like: torch.Tensor) -> torch.Tensor:
    """The extra output of an op's Function: an empty tensor on ``like``'s device (no memory, no launch).
    Saved as an output, it comes back in backward with the op's own autograd node as its ``grad_fn``: the
    edge that leads a marked gradient back to the op's inputs (:func:`once_differentiable`)."""
    return torch.empty((0,), device=like.device)


def no_torch_func(op: str) -> None:
    """A RuntimeError naming the op under a torch.func transform (grad, vjp, vmap, ...), which the ops do not
    support (instead of torch's about ``setup_context``, or a shape error from inside the op)."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(f"mae_fast.ops.{op}: torch.func transforms (grad, vjp, jacrev, vmap, ...) are not "
                           f"supported; differentiate with torch.autograd (backward, torch.autograd.grad)")


def apply(function, op: str, *args):
    """``function.apply(*args)`` without its anchor (the outputs, one tensor or a tuple); see
    :func:`no_torch_func`."""
    no_torch_func(op)
    out = function.apply(*args)
    return out[0] if len(out) == 2 else out[:-1]


def once_differentiable(op: str):
    """Decorator of an op Function's backward, which is not itself differentiable (``op`` names it).

    The backward runs without grad, on the gradients of the Function's outputs but the anchor. Under
    ``create_graph=True`` (grad mode on in the backward) every gradient it returns is marked: differentiating
    it raises an error naming the op. The mark is a node whose inputs are the gradient itself (so that
    ``.backward()`` meets it even when the incoming gradient needs no grad, where torch's
    ``once_differentiable`` would return a gradient without a graph that a gradient penalty silently treats
    as a constant) and the anchor (so that ``torch.autograd.grad`` with respect to the op's inputs meets it
    too: without that edge the marked gradient does not lead back to them, and autograd reports the inputs
    unused, or drops the second-order term of ``grad((g * x).sum(), x)``).
    """
    def wrap(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads[:-1])
            if not torch.is_grad_enabled():
                return out
            outs = out if isinstance(out, tuple) else (out,)
            msg = (f"mae_fast.ops.{op}: its backward is not differentiable (double backward, e.g. create_graph=True "
                   f"for a gradient penalty, is not supported)")
            err = _autograd_functions.DelayedError(msg.encode(), len(outs) + 1)
            marked = err(*[None if g is None else g.detach().requires_grad_(True) for g in outs],
                         ctx.saved_tensors[-1])[:-1]
            return marked if isinstance(out, tuple) else marked[0]
        return wrapper
    return wrap
