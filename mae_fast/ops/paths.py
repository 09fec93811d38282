"""Which path mae_fast's Triton-backed ops take, and when they must go through torch's dispatcher.

- :func:`path` / :func:`set_path` choose the path for every op: ``"auto"`` (CUDA tensors run Triton, CPU
  tensors the plain torch path, or Triton's interpreter under ``TRITON_INTERPRET=1``), ``"torch"`` (the plain
  torch path everywhere, e.g. to compare on a GPU) or ``"triton"`` (Triton or an error, never the torch path).
- :func:`use_triton` answers it for one tensor; :func:`dispatching` says whether a tracer is on (torch.compile,
  or any TorchDispatchMode such as FakeTensorMode or FlopCounterMode), in which case the ops go through their
  registered ``torch.ops.mae_fast.*`` entry points so that the tracer sees one op each.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
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


def dispatching() -> bool:
    """True when an op must go through the dispatcher: torch.compile traces, or a TorchDispatchMode is on."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
