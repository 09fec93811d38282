"""Model configs and factories: the official MAE factory names, their short aliases and a tiny CPU config.

The same table builds the reference (:mod:`mae_fast.reference`) and the fast model (:mod:`mae_fast.models`).
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # every official factory's norm_layer
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# Factory name -> constructor arguments (mlp_ratio 4 and LayerNorm(eps=1e-6) are added for all).
CONFIGS = {
    "mae_vit_base_patch16_dec512d8b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER),
    "mae_vit_large_patch16_dec512d8b": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER),
    "mae_vit_huge_patch14_dec512d8b": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
    # not an official config: 64x64 images, 8x8 patches (L = 64), a ViT-Tiny-like encoder, a 2-block
    # decoder; for CPU tests and the CPU benchmark default
    "mae_vit_tiny_patch8_dec128d2b": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3,
                                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
}
ALIASES = {  # the official short names
    "mae_vit_base_patch16": "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16": "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14": "mae_vit_huge_patch14_dec512d8b",
    "mae_vit_tiny_patch8": "mae_vit_tiny_patch8_dec128d2b",
}
NAMES = [*CONFIGS, *ALIASES]


def config(name: str) -> dict:
    """The constructor arguments of factory ``name`` (mlp_ratio and norm_layer included)."""
    if name not in CONFIGS and name not in ALIASES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(NAMES)}")
    return dict(CONFIGS[ALIASES.get(name, name)], mlp_ratio=4, norm_layer=LAYER_NORM)


def make_factory(cls, name: str):
    """A factory function building ``cls`` with the config named ``name`` (keyword arguments override it)."""
    cfg = config(name)

    def build(**kwargs):
        return cls(**{**cfg, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{cls.__name__} with the {ALIASES.get(name, name)} config; keyword arguments override it."
    return build


def factories(cls) -> dict:
    """{factory name: factory} for every config name and alias."""
    return {name: make_factory(cls, name) for name in NAMES}
