"""patch_model(): swap mae_fast's fast pieces into an existing model, in place, weights kept.

- Every timm-style pre-norm ``Block`` (a module of class name ``Block`` with norm1, attn(qkv, proj,
  num_heads), norm2, mlp) becomes a :class:`mae_fast.nn.Block` that holds the very same submodules
  (parameters are the same objects: an optimizer built before the patch keeps working).
- A model with the official MAE structure (the official ``models_mae.py``, ``mae_fast.reference``)
  also gets the fast forward: masking engine, visible-only patch embedding, fused unshuffle and loss
  (its class is swapped for a subclass that adds :class:`mae_fast.models.mae.FastMAEMethods`).
After the patch the same noise gives the same loss, pred and mask.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .models.mae import FastMAEMethods
from .nn import Block, PatchEmbed

MAE_ATTRIBUTES = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token",
                  "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss")

_PATCHED_CLASSES: dict = {}


def _is_timm_block(m: nn.Module) -> bool:
    attn = getattr(m, "attn", None)
    return (type(m).__name__ == "Block" and not isinstance(m, Block)
            and all(hasattr(m, a) for a in ("norm1", "norm2", "mlp"))
            and attn is not None and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads")))


def _fast_block(old: nn.Module, attn_backend: Optional[str]) -> Block:
    attn = old.attn
    dim = attn.qkv.in_features
    new = Block(dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None, attn_backend=attn_backend)
    new.norm1, new.norm2, new.mlp = old.norm1, old.norm2, old.mlp
    new.attn.qkv, new.attn.proj = attn.qkv, attn.proj
    new.attn.scale = getattr(attn, "scale", new.attn.scale)
    for name in ("q_norm", "k_norm", "proj_drop"):
        if isinstance(getattr(attn, name, None), nn.Module):
            setattr(new.attn, name, getattr(attn, name))
    drop = getattr(attn, "attn_drop", 0.0)  # a Dropout module (timm) or a float (some versions)
    new.attn.attn_drop = nn.Dropout(drop.p if isinstance(drop, nn.Dropout) else float(drop))
    for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
        if isinstance(getattr(old, name, None), nn.Module):
            setattr(new, name, getattr(old, name))
    if isinstance(getattr(old, "drop_path", None), nn.Module):  # older timm: one module for both
        new.drop_path1 = new.drop_path2 = old.drop_path
    return new.train(old.training)


def _swap_blocks(model: nn.Module, attn_backend: Optional[str]) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_timm_block(child):
                setattr(parent, name, _fast_block(child, attn_backend))
                count += 1
    return count


def _fast_patch_embed(old: nn.Module) -> PatchEmbed:
    if isinstance(old, PatchEmbed):
        return old
    proj = old.proj
    new = PatchEmbed(old.img_size, old.patch_size, proj.in_channels, proj.out_channels, bias=proj.bias is not None,
                     num_frames=getattr(old, "num_frames", 1), t_patch_size=getattr(old, "t_patch_size", 1))
    new.proj = proj
    if isinstance(getattr(old, "norm", None), nn.Module):
        new.norm = old.norm
    return new.train(old.training)


def is_official_mae(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in MAE_ATTRIBUTES)


def patch_model(model: nn.Module, *, attn_backend: Optional[str] = None) -> nn.Module:
    """Swap mae_fast's blocks (and, for an official-structure MAE, its fast forward) into ``model``.

    In place; weights (the same parameter objects) kept; returns ``model``. ``attn_backend`` is given
    to every swapped block (None: the global setting, see ``mae_fast.nn.set_attn_backend``).
    Raises ValueError if the model has neither timm-style blocks nor the MAE structure.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = _swap_blocks(model, attn_backend)
    if is_official_mae(model):
        model.patch_embed = _fast_patch_embed(model.patch_embed)
        cls = type(model)
        if not issubclass(cls, FastMAEMethods):
            if cls not in _PATCHED_CLASSES:
                _PATCHED_CLASSES[cls] = type(f"Fast{cls.__name__}", (FastMAEMethods, cls), {"__module__": cls.__module__})
            model.__class__ = _PATCHED_CLASSES[cls]
    elif swapped == 0:
        raise ValueError(f"patch_model: {type(model).__name__} has no timm-style Block and not the official MAE "
                         f"structure ({', '.join(MAE_ATTRIBUTES)})")
    return model
