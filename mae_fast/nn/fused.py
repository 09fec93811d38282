"""The fused forward of a pre-norm ViT block: the block as six fused ops instead of about thirty kernels.

    y1, x = add_layer_norm(x)                      LayerNorm 1, cast to the GEMM dtype
    o     = self_attention(y1)                     qkv GEMM + attention reading and writing the packed qkv
    p     = linear(o, proj.weight)                 (the proj bias is added in the next op)
    y2, s = add_layer_norm(x, branch=p + bias)     residual add + LayerNorm 2 + cast
    m     = mlp(y2)                                fc1 GEMM with bias + GELU in its epilogue, fc2 GEMM;
                                                   dGELU and fc1's bias gradient in the dgrad GEMM's epilogue
    out   = residual_add(s, m, fc2.bias)           (or fused into the next block's first LayerNorm)

Under autocast the residual stream (x, s, out) stays in its own dtype (fp32 for an fp32 model) and only
the GEMMs and their inputs are in the autocast dtype, as in the reference; LayerNorm statistics are fp32.
Which blocks run here, and for each op whether the fused op or its stock counterpart runs (measured on the
GPU, per shape), is decided in :mod:`mae_fast.nn.policy`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .policy import block_reason, gemm_dtype, is_layer_norm, run


def _after_norm1(block, y1: torch.Tensor, x: torch.Tensor, dtype: torch.dtype):
    """The block from its first LayerNorm's output y1 and its input x: (s, m), the block's output being
    s + m + mlp.fc2.bias (left to the caller, to fuse with what comes next)."""
    n2, attn, mlp = block.norm2, block.attn, block.mlp
    drop = attn.attn_drop.p if block.training and isinstance(attn.attn_drop, nn.Dropout) else 0.0
    o = run("self_attention", y1, attn.qkv.weight, attn.qkv.bias, attn.num_heads, attn.scale, drop,
            getattr(attn, "attn_backend", None), owner=block)  # [B, N, C]
    p = run("linear", o, attn.proj.weight, None, owner=block)  # [B, N, C], its bias goes into the next op
    y2, s = run("add_layer_norm", x, n2.weight, n2.bias, n2.eps, p, attn.proj.bias, dtype, owner=block)
    # fc1 + bias + GELU + fc2 (its bias goes into the next op): [B, N, C]
    m = run("mlp", y2, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, None, mlp.act.approximate, owner=block)
    return s, m


def fused_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The block on x [B, N, C] through the fused ops (``block_reason(block, x)`` must be None)."""
    dtype = gemm_dtype(x)
    n1 = block.norm1
    y1, x = run("add_layer_norm", x, n1.weight, n1.bias, n1.eps, None, None, dtype, owner=block)  # [B, N, C]
    s, m = _after_norm1(block, y1, x, dtype)
    return run("residual_add", s, m, block.mlp.fc2.bias, owner=block)  # [B, N, C] in s's dtype


def run_blocks(blocks, x: torch.Tensor, norm: Optional[nn.Module] = None,
               norm_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``norm(blocks[-1](...blocks[0](x)))`` (``norm`` None: no norm) with each block's last residual add
    fused into the next block's first LayerNorm (and into ``norm``, a LayerNorm, output in ``norm_dtype``).
    Blocks that cannot run fused run as they are, in order."""
    pending = None  # (s, m, bias): the output s + m + bias of the previous fused block, not yet added
    for block in blocks:
        if block_reason(block, x if pending is None else pending[0]) is not None:
            if pending is not None:
                x, pending = run("residual_add", *pending), None
            x = block(x)
            continue
        n1 = block.norm1
        base = pending[0] if pending is not None else x
        dtype = gemm_dtype(base)
        if pending is None:
            y1, x = run("add_layer_norm", x, n1.weight, n1.bias, n1.eps, None, None, dtype, owner=block)
        else:
            s, m, bias = pending
            y1, x = run("add_layer_norm", s, n1.weight, n1.bias, n1.eps, m, bias, dtype, owner=block)
        s, m = _after_norm1(block, y1, x, dtype)
        pending = (s, m, block.mlp.fc2.bias)
    if pending is not None:
        if norm is not None and is_layer_norm(norm):
            s, m, bias = pending
            return run("add_layer_norm", s, norm.weight, norm.bias, norm.eps, m, bias, norm_dtype)[0]
        x = run("residual_add", *pending)
    if norm is None:
        return x
    if is_layer_norm(norm):
        return run("add_layer_norm", x, norm.weight, norm.bias, norm.eps, None, None, norm_dtype)[0]
    return norm(x)
