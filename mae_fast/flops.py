"""Model FLOPs per image of an MAE training step, counted analytically from the config and the mask ratio.

Counted: every matrix multiply (2 FLOPs per multiply-add): patch embedding, q/k/v, attention scores
(Q K^T) and attention-weighted values (A V), attention output projection, MLP, decoder embedding and
the decoder head. Not counted: norms, softmax, GELU, additions, masking, gathers, the loss (a few
percent at most; leaving them out is the usual convention and makes MFU a slight under-estimate).

Tokens: the encoder runs on 1 + K tokens (cls + visible, K = int(L * (1 - ratio))), the decoder on
1 + L. Two things differ between implementations and are parameters:
- ``embed_visible_only``: the patch embedding is applied to the K visible patches only (mae_fast)
  instead of all L (the reference, which embeds every patch and then drops the masked ones);
- ``pred_masked_only``: the decoder head runs on the L - K removed tokens only (mae_fast; the loss
  reads nothing else) instead of all 1 + L rows (the reference).
A training step counts as 3x the forward (backward = 2x forward), the usual convention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["MAEDims", "dims_of", "dims_of_config", "forward_flops", "train_flops", "flops_breakdown"]


@dataclass(frozen=True)
class MAEDims:
    """The sizes that fix an MAE's FLOPs."""

    img_h: int
    img_w: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    mlp_hidden: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_mlp_hidden: int

    @property
    def num_patches(self) -> int:
        return (self.img_h // self.patch_size) * (self.img_w // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def as_dict(self) -> dict:
        return asdict(self)


def _pair(v):
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def dims_of(model: torch.nn.Module) -> MAEDims:
    """Read the sizes from a model with the official/timm names (reference or mae_fast.models)."""
    m = getattr(model, "module", model)  # DDP
    m = getattr(m, "_orig_mod", m)  # torch.compile
    m = getattr(m, "model", m)  # benchmark wrappers
    pe = m.patch_embed
    p = _pair(pe.patch_size)[0]
    H, W = _pair(pe.img_size)
    return MAEDims(
        img_h=H, img_w=W, patch_size=p, in_chans=int(pe.proj.in_channels) if hasattr(pe.proj, "in_channels") else int(pe.in_chans),
        embed_dim=int(m.cls_token.shape[-1]), depth=len(m.blocks),
        mlp_hidden=int(m.blocks[0].mlp.fc1.out_features) if len(m.blocks) else 0,
        decoder_embed_dim=int(m.mask_token.shape[-1]), decoder_depth=len(m.decoder_blocks),
        decoder_mlp_hidden=int(m.decoder_blocks[0].mlp.fc1.out_features) if len(m.decoder_blocks) else 0,
    )


def dims_of_config(model_name: str, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> MAEDims:
    """Sizes of a reference factory config, built on the meta device (no memory, no init cost)."""
    from . import reference

    kwargs = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    with torch.device("meta"):
        model = reference.create_model(model_name, **kwargs)
    return dims_of(model)


def _block_flops(tokens: int, dim: int, hidden: int) -> dict:
    t, d = tokens, dim
    return {
        "qkv": 2 * t * d * 3 * d,
        "attention": 2 * t * t * d * 2,  # Q K^T and A V over all heads
        "proj": 2 * t * d * d,
        "mlp": 2 * t * d * hidden * 2,  # fc1 and fc2
    }


def flops_breakdown(dims: MAEDims, mask_ratio: float, embed_visible_only: bool = False,
                    pred_masked_only: bool = False) -> dict:
    """Forward FLOPs per image by part (patch_embed, encoder_*, decoder_embed, decoder_*, decoder_pred)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    L = dims.num_patches
    K = int(L * (1 - mask_ratio))
    out = {"patch_embed": 2 * (K if embed_visible_only else L) * dims.patch_dim * dims.embed_dim}
    for k, v in _block_flops(1 + K, dims.embed_dim, dims.mlp_hidden).items():
        out["encoder_" + k] = v * dims.depth
    out["decoder_embed"] = 2 * (1 + K) * dims.embed_dim * dims.decoder_embed_dim
    for k, v in _block_flops(1 + L, dims.decoder_embed_dim, dims.decoder_mlp_hidden).items():
        out["decoder_" + k] = v * dims.decoder_depth
    out["decoder_pred"] = 2 * ((L - K) if pred_masked_only else (1 + L)) * dims.decoder_embed_dim * dims.patch_dim
    return out


def forward_flops(dims: MAEDims, mask_ratio: float, embed_visible_only: bool = False,
                  pred_masked_only: bool = False) -> int:
    """Forward matmul FLOPs per image."""
    return int(sum(flops_breakdown(dims, mask_ratio, embed_visible_only, pred_masked_only).values()))


def train_flops(dims: MAEDims, mask_ratio: float, embed_visible_only: bool = False,
                pred_masked_only: bool = False) -> int:
    """Training-step FLOPs per image: 3x the forward."""
    return 3 * forward_flops(dims, mask_ratio, embed_visible_only, pred_masked_only)
