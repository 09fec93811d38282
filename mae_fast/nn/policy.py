"""Where mae_fast decides between its fused ops and the stock modules: one place for every such decision.

- :func:`kernels_apply`: whether the ops run kernels for a tensor at all (CUDA, Triton's interpreter, a path
  chosen with ``mae_fast.ops.path``, or a tracer that should see what a CUDA run executes). On a plain CPU the
  stock modules are faster than the ops' plain torch path (which is there to be the reference).
- :func:`unfused_reason`: why a block runs module by module (None: it runs through :mod:`mae_fast.nn.fused`).
- :func:`norm` / :func:`linear`: a model's LayerNorm and Linear through the fused ops where they apply.
- :func:`gemm_dtype`, :func:`is_layer_norm`: the dtype a GEMM runs in, and which norms the fused op replaces.
- ``set_fused_blocks(False)`` turns the fused blocks off everywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .. import ops

_enabled = True


def set_fused_blocks(enabled: bool) -> None:
    """Run every standard mae_fast.nn.Block through the fused ops (default) or module by module."""
    global _enabled
    _enabled = bool(enabled)


def fused_blocks_enabled() -> bool:
    return _enabled


def _is_identity(m) -> bool:
    return isinstance(m, nn.Identity) or (getattr(m, "drop_prob", None) == 0.0)


def _inactive_dropout(m, training: bool) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (m.p == 0.0 or not training))


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether blocks, norms and linears go through the fused ops for x: on CUDA, under Triton's
    interpreter, on a path chosen explicitly with ``mae_fast.ops.path``, and under a TorchDispatchMode
    (fake tensors, FlopCounterMode, op tracers), which then sees the ops a CUDA run executes. On a plain
    CPU the stock modules are faster than the ops' plain torch path (which is there to be the reference),
    so they run as they are."""
    return ops.get_path() != "auto" or ops.use_triton(x) or is_in_torch_dispatch_mode()


def unfused_reason(block, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``block`` runs module by module (None when it runs fused), for input ``x`` if given."""
    if not _enabled:
        return "fused blocks are turned off (mae_fast.nn.set_fused_blocks(False))"
    if x is not None and (x.dim() != 3 or not x.is_floating_point()):
        return f"input is not a float [B, N, C] tensor (got {x.dim()} dims, {x.dtype})"
    if x is not None and not kernels_apply(x):
        return f"no kernels for {x.device.type} tensors: the stock modules are faster than the ops' torch path"
    if torch.compiler.is_compiling():
        return "torch.compile traces the module-by-module forward and fuses it itself"
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    for name in ("norm1", "norm2"):
        norm = getattr(block, name, None)
        if not is_layer_norm(norm):
            return f"{name} is {type(norm).__name__}, not a LayerNorm over the last dim"
    if not (hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(attn, "num_heads")):
        return "attn is not a qkv/proj attention"
    for name in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(attn, name, nn.Identity())):
            return f"attn.{name} is used"
    if type(attn.qkv) is not nn.Linear or type(attn.proj) is not nn.Linear:
        return "attn.qkv / attn.proj are not nn.Linear"
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim or dim % attn.num_heads:
        return "attn's width differs from the block's (attn_head_dim / dim_out)"
    if getattr(attn, "gate", None) is not None:
        return "attn is gated"
    if not isinstance(getattr(attn, "attn_drop", None), (nn.Dropout, nn.Identity)):
        return "attn.attn_drop is not a Dropout"
    for name in ("ls1", "ls2"):
        if not _is_identity(getattr(block, name, nn.Identity())):
            return f"{name} is used"
    for name in ("drop_path1", "drop_path2"):
        if block.training and not _is_identity(getattr(block, name, nn.Identity())):
            return f"{name} is active"
    if not (type(getattr(mlp, "fc1", None)) is nn.Linear and type(getattr(mlp, "fc2", None)) is nn.Linear):
        return "mlp is not an fc1/fc2 MLP"
    if type(getattr(mlp, "act", None)) is not nn.GELU:
        return f"mlp.act is {type(getattr(mlp, 'act', None)).__name__}, not GELU"
    if not _is_identity(getattr(mlp, "norm", nn.Identity())):
        return "mlp.norm is used"
    training = block.training
    for owner, name in ((attn, "proj_drop"), (mlp, "drop1"), (mlp, "drop2"), (mlp, "drop")):
        if not _inactive_dropout(getattr(owner, name, nn.Identity()), training):
            return f"dropout {name} is active"
    return None


def is_layer_norm(m) -> bool:
    """A plain nn.LayerNorm over the last dim: what ops.add_layer_norm computes."""
    return type(m) is nn.LayerNorm and len(m.normalized_shape) == 1


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM consuming x runs in: the autocast dtype on x's device, else x's own."""
    return ops.autocast_dtype(x) or x.dtype


def norm(module: nn.Module, x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A LayerNorm through the fused op (fp32 statistics, output cast once to ``out_dtype``) where the ops run
    kernels, any other norm (or on a plain CPU) as it is."""
    if is_layer_norm(module) and kernels_apply(x):
        return ops.add_layer_norm(x, module.weight, module.bias, module.eps, out_dtype=out_dtype)[0]
    return module(x)


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An nn.Linear through ops.linear (fp32 weight gradient, no per-step casts of it) where the ops run
    kernels, anything else (or on a plain CPU) as it is."""
    if type(module) is nn.Linear and kernels_apply(x):
        return ops.linear(x, module.weight, module.bias)
    return module(x)
