"""The pre-norm ViT block with timm 1.0's constructor, forward signature and state_dict keys (timm's ``Block``),
and the two small layers it uses, ``LayerScale`` and ``DropPath``. A standard block runs through mae_fast's
fused ops where they apply (:mod:`mae_fast.nn.policy` decides, :mod:`mae_fast.nn.fused` runs it)."""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from ._common import DEFAULT_NORM, check_tokens, class_key, factory
from .attention import TIMM_ATTENTION, Attention
from .fused import fused_forward
from .mlp import TIMM_MLP, Mlp
from .policy import block_reason


class LayerScale(nn.Module):
    """x * gamma, gamma [dim] initialised to ``init_values`` (timm's ``LayerScale``; ``inplace``: x.mul_)."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, **factory(device, dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``drop_prob`` (in
    training); kept samples are divided by the keep probability when ``scale_by_keep`` (timm's)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # [N, 1, ...]
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class Block(nn.Module):
    """Pre-norm ViT block, timm 1.0's ``Block``: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2.

    ``x + drop_path1(ls1(attn(norm1(x))))``, then ``x + drop_path2(ls2(mlp(norm2(x))))``. timm's arguments
    and defaults (norm_layer LayerNorm with eps 1e-6; ``scale_attn_norm``/``scale_mlp_norm`` add the norms
    inside attn / mlp; ``depth`` reaches an attention layer that uses it as timm does). ``attn_layer``:
    this module's :class:`Attention` for None, "", "attn", this class or timm's ``Attention``; any other
    class is built with timm's arguments (other strings are an error: pass the class). ``mlp_layer``
    likewise (timm's ``Mlp`` becomes :class:`Mlp`). Added: ``qk_scale``, ``drop`` (older timm's name of
    proj_drop) and ``attn_backend``. ``mae_fast.nn.unfused_reason(block)`` says whether it runs
    through the fused ops (mae_fast.nn.fused) and, if not, why.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=DEFAULT_NORM, mlp_layer=None, attn_layer=None, depth: int = 0, device=None, dtype=None,
                 *, qk_scale: Optional[float] = None, drop: Optional[float] = None,
                 attn_backend: Optional[str] = None):
        super().__init__()
        dd = factory(device, dtype)
        if drop is not None:  # older timm (and the official MAE code's era) named proj_drop `drop`
            proj_drop = drop
        attn_cls = _attention_class(attn_layer)
        mlp_cls = _mlp_class(mlp_layer)
        attn_kwargs = dict(num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
                           proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        if attn_cls is Attention:
            attn_kwargs.update(qk_scale=qk_scale, attn_backend=attn_backend)
        else:
            for name, value in (("qk_scale", qk_scale), ("attn_backend", attn_backend)):
                if value is not None:
                    raise ValueError(f"{name} is for mae_fast's Attention; attn_layer={attn_cls.__name__} does not take it")
            if _uses_depth(attn_cls):
                attn_kwargs["depth"] = depth
        mlp_kwargs = dict(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                          bias=proj_bias, drop=proj_drop, **dd)
        if scale_mlp_norm:
            mlp_kwargs["norm_layer"] = norm_layer

        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_cls(dim, **attn_kwargs)
        self.ls1 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_cls(**mlp_kwargs)
        self.ls2 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False) -> torch.Tensor:
        check_tokens(x, self.attn.qkv.in_features)
        if attn_mask is None and not is_causal and block_reason(self, x) is None:
            return fused_forward(self, x)  # the same block through mae_fast's fused ops (mae_fast.nn.fused)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _attention_class(attn_layer):
    if attn_layer is None or attn_layer is Attention or class_key(attn_layer) in TIMM_ATTENTION:
        return Attention
    if isinstance(attn_layer, str):
        if attn_layer in ("", "attn"):
            return Attention
        raise ValueError(f"attn_layer={attn_layer!r}: mae_fast.nn.Block resolves only '' and 'attn' "
                         f"(its own Attention); pass another attention as a class")
    if not isinstance(attn_layer, type):
        raise TypeError(f"attn_layer must be None, a string or a class, got {type(attn_layer).__name__}")
    return attn_layer


def _mlp_class(mlp_layer):
    if mlp_layer is None or mlp_layer is Mlp or class_key(mlp_layer) in TIMM_MLP:
        return Mlp
    if not isinstance(mlp_layer, type) and not callable(mlp_layer):
        raise TypeError(f"mlp_layer must be None or a class, got {type(mlp_layer).__name__}")
    return mlp_layer


def _uses_depth(attn_cls) -> bool:
    """timm passes ``depth`` only to subclasses of its DiffAttention (which exist only once timm is imported)."""
    diff = getattr(sys.modules.get("timm.layers"), "DiffAttention", None)
    return isinstance(attn_cls, type) and diff is not None and issubclass(attn_cls, diff)
