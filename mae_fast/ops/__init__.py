"""The public ops of mae_fast: validated, autograd-aware, torch.compile-visible.

Each op has a fast path (Triton kernels / the CUDA extension) and a plain torch path beside
it, used on CPU and as the test oracle. See ``_common`` for the dispatch rule.
"""
