"""Drop-in ViT layers with timm's constructors and state_dict keys.

``Attention``, ``Mlp``, ``Block``, ``PatchEmbed``, ``LayerScale``, ``DropPath``: keyword-compatible
with timm's current constructors and with the older ones the official MAE code calls
(``qk_scale=None``, ``drop=``), so timm and official checkpoints load with ``strict=True``.
Attention runs through :func:`mae_fast.nn.attention.attention` (selectable backend).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..ops import gather_patches
from .attention import BACKENDS, attention

Size2 = reference.Size2


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer=nn.LayerNorm, qk_scale: Optional[float] = None, attn_backend: Optional[str] = None,
                 **kwargs):
        super().__init__()
        _reject_unknown("Attention", kwargs)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_backend is not None and attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be None or one of {BACKENDS}, got {attn_backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.qkv.in_features)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = attention(q, k, v, backend=self.attn_backend, dropout_p=dropout_p, scale=self.scale)  # [B, H, N, hd]
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, C]
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, norm_layer=None, bias: bool = True, drop: float = 0.0, **kwargs):
        super().__init__()
        _reject_unknown("Mlp", kwargs)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm ViT block, timm's ``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, mlp_layer=Mlp, qk_scale: Optional[float] = None,
                 drop: Optional[float] = None, attn_backend: Optional[str] = None, **kwargs):
        super().__init__()
        _reject_unknown("Block", kwargs)
        if drop is not None:  # older timm (and the official MAE code's era) named proj_drop `drop`
            proj_drop = drop
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, qk_scale=qk_scale,
                              attn_backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             bias=proj_bias, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.attn.qkv.in_features)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(reference.PatchEmbed):
    """Image to patch embedding (Conv2d, kernel = stride = patch size), timm's keys ``proj.*``.

    ``forward_visible(imgs, ids_keep)`` embeds only the visible patches: the raw pixels of the kept
    patches are gathered by :func:`mae_fast.ops.gather_patches` and multiplied by the conv weight as
    one GEMM. Exact, and 1/(1 - mask_ratio) fewer FLOPs than embedding every patch.

    The grid, the video layout (``num_frames`` > 1 or ``t_patch_size`` > 1, not in timm: a Conv3d of
    kernel = stride = (u, p, p) on [N, C, T, H, W], tokens (slot, row, col)) and the projection come from
    ``mae_fast.reference.PatchEmbed``; this class adds timm's ``norm_layer``/``flatten`` and the fast paths.
    """

    def __init__(self, img_size: Size2 = 224, patch_size: Size2 = 16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer=None, flatten: bool = True, bias: bool = True, num_frames: int = 1,
                 t_patch_size: int = 1, **kwargs):
        _reject_unknown("PatchEmbed", kwargs)
        super().__init__(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size, bias=bias)
        self.flatten = flatten
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def check_input(self, imgs: torch.Tensor) -> None:
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        expected = self.input_shape()
        if imgs.dim() != len(expected) or list(imgs.shape[1:]) != expected[1:]:
            raise ValueError(f"imgs must have shape [{', '.join(map(str, expected))}], got {list(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        self.check_input(imgs)
        x = self.proj(imgs)  # [N, D, (t,) h, w]
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # [N, L, D]
        return self.norm(x)

    def forward_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Embeddings of the patches named by ``ids_keep`` [N, K] only: [N, K, D]."""
        self.check_input(imgs)
        # [N, K, C*(u*)p*p] in the order of the flattened conv weight: (C, (u,) p, p)
        if self.video:
            patches = gather_patches(imgs, ids_keep, self.patch_size[0], t_patch_size=self.t_patch_size)
        else:
            patches = gather_patches(imgs, ids_keep, self.patch_size[0])
        weight = self.proj.weight.flatten(1)  # [D, C*(u*)p*p]
        if patches.dtype != weight.dtype and not torch.is_autocast_enabled(imgs.device.type):
            raise TypeError(f"imgs dtype {imgs.dtype} differs from the patch embedding weight dtype {weight.dtype}")
        return self.norm(F.linear(patches, weight, self.proj.bias))  # [N, K, D]


def _check_tokens(x: torch.Tensor, dim: int) -> None:
    """Attention and Block take tokens [B, N, dim]; anything else is a ValueError saying so."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of tokens [B, N, {dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be tokens [B, N, {dim}] (batch, tokens, dim), got shape {list(x.shape)}")


def _reject_unknown(cls: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{cls}() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
