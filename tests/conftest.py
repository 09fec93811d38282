"""Shared test set-up: CPU by default (tests marked ``gpu`` need CUDA), and the fixtures that choose an
op path. Without a GPU, ``make test`` runs the suite with ``TRITON_INTERPRET=1`` (the Triton kernels
through the interpreter) and the op tests once more on the plain torch path."""
import importlib
import os
import pkgutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mae_fast import ops
from mae_fast.ops.paths import triton_interpret

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    # several test processes share the cores (make test runs one per core): one torch thread each
    torch.set_num_threads(1)
TRITON_RUNS = torch.cuda.is_available() or triton_interpret()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run on a GPU machine: scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _kernels():
    """Every Triton kernel in mae_fast.kernels (JIT or interpreted functions)."""
    import mae_fast.kernels as package
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"mae_fast.kernels.{info.name}")
        found.update({id(v): v for v in vars(module).values()
                      if hasattr(v, "add_pre_run_hook") and not isinstance(v, type)})
    return found.values()


class Launches:
    """Counts launches of mae_fast's Triton kernels, by kernel name (Triton's pre-run hooks)."""

    def __init__(self):
        self.counts = {}

    def __enter__(self):
        self._hooks = []
        for k in _kernels():
            def hook(*args, _name=k.__name__, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
            k.add_pre_run_hook(hook)
            self._hooks.append((k, hook))
        return self

    def __exit__(self, *exc):
        for k, hook in self._hooks:
            k.pre_run_hooks.remove(hook)


@pytest.fixture
def triton_path():
    """Run the test's ops on their Triton kernels (path "triton": an error, never the torch path, where
    Triton cannot run) and fail the test if no Triton kernel was launched; skipped where Triton cannot run
    at all (a CPU without TRITON_INTERPRET=1). Yields the launch counts."""
    if not TRITON_RUNS:
        pytest.skip("the Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1")
    with ops.path("triton"), Launches() as launches:
        yield launches.counts
    assert launches.counts, "no Triton kernel was launched on the 'triton' path"


@pytest.fixture
def torch_path():
    """Run the test's ops on their plain torch path."""
    with ops.path("torch"):
        yield


@pytest.fixture(params=["torch", "triton"])
def each_path(request):
    """The test once per op path (torch_path, then triton_path: the Triton one must launch kernels); the
    value is the path's name."""
    request.getfixturevalue(f"{request.param}_path")
    return request.param


class RecordOps(TorchDispatchMode):
    """A pass-through TorchDispatchMode that records the ops it sees (name -> list of (args, out)). While
    it is on, mae_fast's ops go through their registered kernels, as under torch.compile."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.setdefault(func.overloadpacket.__name__, []).append((args, out))
        return out


@pytest.fixture
def record_ops():
    return RecordOps
