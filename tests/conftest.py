"""Test configuration: tests run on CPU by default; tests marked ``gpu`` need CUDA.

Under ``make test`` on a machine without a GPU, ``TRITON_INTERPRET=1`` is set so the Triton
kernels run through the interpreter on CPU tensors.
"""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run on the GPU machine: scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
