"""Drop-in ViT layers (timm-compatible constructors and keys) with selectable attention backends."""
from .attention import (BACKENDS, attention, attn_autotune_results, attn_backend, auto_backend,
                        clear_attn_autotune, get_attn_backend, set_attn_autotune, set_attn_backend)
from .fused import fused_blocks_enabled, set_fused_blocks, unfused_reason
from .layers import Attention, Block, DropPath, LayerScale, Mlp, PatchEmbed

__all__ = [
    "Attention", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed",
    "BACKENDS", "attention", "attn_backend", "auto_backend", "get_attn_backend", "set_attn_backend",
    "attn_autotune_results", "clear_attn_autotune", "set_attn_autotune",
    "fused_blocks_enabled", "set_fused_blocks", "unfused_reason",
]
