"""How the ops launch their Triton kernels: ``launch(kernel)[grid](*args, **kwargs)``.

An eager launch (real tensors, nothing tracing) calls the kernel directly: the host cost is Triton's own
launch. Only while something traces (torch.compile, a TorchDispatchMode, fake or functional tensors in the
arguments) does the launch go through ``torch.library.wrap_triton``, whose higher-order op the tracer can
record; used eagerly it would bind arguments, build autotuner objects and keep an entry in torch's kernel side
table on every call. :func:`observe_launches` records launches (kernel, grid, arguments) for tools such as
``make triton-check``.
"""
from __future__ import annotations

import contextlib

import torch

from .paths import dispatching

_observers: list = []  # (callback, run): run False records the launch without running it
_PLAIN = {torch.Tensor, torch.nn.Parameter, int, float, bool, str, type(None)}  # types a real launch passes


def _traced(args, kwargs) -> bool:
    """Whether this launch is part of a trace: a tracer is on, or an argument is a tensor subclass (fake,
    functional or proxy tensors stand for real ones there). Type tests only: this runs on every launch."""
    if dispatching():
        return True
    for a in (*args, *kwargs.values()):
        t = type(a)
        if t not in _PLAIN and issubclass(t, torch.Tensor):
            return True
    return False


class _Launch:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if _observers:
                for observe, _ in _observers:
                    observe(self.fn, grid, args, kwargs)
                if not all(execute for _, execute in _observers):
                    return
            if _traced(args, kwargs):
                torch.library.wrap_triton(self.fn)[grid](*args, **kwargs)
            else:
                self.fn[grid](*args, **kwargs)
        return run


def launch(fn) -> _Launch:
    """``launch(kernel)[grid](*args, **kwargs)``: see the module docstring."""
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
