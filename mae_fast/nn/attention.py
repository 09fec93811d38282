"""Multi-head self-attention with timm 1.0's constructor, forward signature and state_dict keys (timm's
``Attention``), the attention itself run through a selectable backend (:mod:`mae_fast.nn.attn_backends`)."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from ._common import check_tokens, factory
from .attn_backends import _SDPA, BACKENDS, attention, get_attn_backend

# Where timm defines the standard attention (timm 1.0, and the older path): a Block given one of these as
# attn_layer builds this module's Attention, which computes the same.
TIMM_ATTENTION = {("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")}


class Attention(nn.Module):
    """Multi-head self-attention, timm 1.0's ``Attention``: qkv, q_norm, k_norm, norm, gate, proj.

    timm's arguments: ``attn_head_dim`` (head size; default dim // num_heads), ``dim_out`` (default
    dim), ``qk_norm`` (norm_layer(head_dim) on q and k), ``scale_norm`` (norm_layer(num_heads*head_dim)
    on the attention output), ``gated`` (output times sigmoid(gate(x)), gate a Linear with qkv's bias
    setting), ``norm_layer`` (required by qk_norm and scale_norm), ``device``/``dtype``. Added:
    ``qk_scale`` (older timm: the logit scale, default head_dim**-0.5) and ``attn_backend``.
    ``forward(x, attn_mask=None, is_causal=False)``: with a mask or ``is_causal`` the attention is
    ``F.scaled_dot_product_attention`` with that mask (an SDPA ``attn_backend`` is kept; "auto" lets
    SDPA choose; "xformers" and "mae_fast" are refused).
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None, *,
                 qk_scale: Optional[float] = None, attn_backend: Optional[str] = None):
        super().__init__()
        dd = factory(device, dtype)
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) "
                                 f"unless attn_head_dim is given")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        if attn_backend is not None and attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be None or one of {BACKENDS}, got {attn_backend!r}")
        dim_out = dim_out or dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = qk_scale if qk_scale is not None else attn_head_dim**-0.5
        self.attn_backend = attn_backend
        # registration order = timm's (state_dict order): qkv, q_norm, k_norm, norm, gate, proj
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        check_tokens(x, self.qkv.in_features)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None  # [B, N, H*hd]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and not is_causal:
            x = attention(q, k, v, backend=self.attn_backend, dropout_p=dropout_p, scale=self.scale)  # [B, H, N, hd]
        else:
            x = _masked_attention(q, k, v, self.attn_backend, attn_mask, is_causal, dropout_p, self.scale)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))  # [B, N, H*hd]
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _masked_attention(q, k, v, backend: Optional[str], attn_mask, is_causal: bool, dropout_p: float, scale: float):
    """SDPA with a mask or causal flag (as timm's fused path), under the named SDPA backend if one is set."""
    name = backend if backend is not None else get_attn_backend()
    if name in ("xformers", "mae_fast"):
        raise ValueError(f"attn_mask / is_causal are not supported with attn_backend={name!r}; "
                         "use an SDPA backend or 'auto'")
    sdpa = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                   is_causal=is_causal, scale=scale)
    if name == "auto":
        return sdpa()
    with sdpa_kernel(_SDPA[name]):
        return sdpa()
