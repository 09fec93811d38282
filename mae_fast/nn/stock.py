"""The stock computation of each fused block op: what the reference's modules run (nn.Linear, F.layer_norm,
F.gelu, SDPA through the attention backend, the residual adds), with the fused op's signature and result
dtypes. :mod:`mae_fast.nn.policy` times each fused op against its stock counterpart on the GPU it meets and
keeps the faster; these are also what runs when the fused ops are turned off per op
(``MAE_FAST_FUSED=stock``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attn_backends import attention


def add_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   branch: Optional[Tensor], branch_bias: Optional[Tensor], out_dtype: Optional[torch.dtype]):
    """(y, s) as ops.add_layer_norm: s = x + (branch + branch_bias) in x's dtype, y = LayerNorm(s) in out_dtype."""
    if branch is None:
        s = x
    else:
        b = branch if branch_bias is None else branch + branch_bias.to(branch.dtype)  # the module's own output
        s = (x + b).to(x.dtype)
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)  # fp32 under autocast
    return y.to(out_dtype or x.dtype), s


def bias_gelu(h: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    """gelu(h + bias) in h's dtype, as nn.Linear (bias in the GEMM's dtype) then nn.GELU."""
    return F.gelu(h if bias is None else h + bias.to(h.dtype), approximate=approximate)


def residual_add(s: Tensor, branch: Tensor, bias: Optional[Tensor]) -> Tensor:
    """s + (branch + bias) in s's dtype."""
    b = branch if bias is None else branch + bias.to(branch.dtype)
    return (s + b).to(s.dtype)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """nn.Linear's F.linear (under autocast: the autocast dtype, the weight cast at every call)."""
    return F.linear(x, weight, bias)


def self_attention(x: Tensor, weight: Tensor, bias: Optional[Tensor], num_heads: int, scale: Optional[float],
                   dropout_p: float, backend: Optional[str]) -> Tensor:
    """The qkv projection and attention as timm's Attention runs them: [B, N, C] -> [B, N, C]."""
    B, N, C = x.shape
    qkv = F.linear(x, weight, bias).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, hd]
    o = attention(q, k, v, backend=backend, dropout_p=dropout_p, scale=scale)  # [B, H, N, hd]
    return o.transpose(1, 2).reshape(B, N, C)


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
        approximate: str) -> Tensor:
    """fc1, GELU, fc2 as timm's Mlp runs them."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
