"""Triton kernels of mae_fast, one file per fused op; installed as ``mae_fast.kernels``.

Kernels here are raw ``@triton.jit`` functions plus their launch helpers; the public,
validated, autograd-aware ops that call them live in ``mae_fast.ops``.
"""
