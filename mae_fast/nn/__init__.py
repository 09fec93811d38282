"""Drop-in ViT layers with timm's constructors, forward signatures and state_dict keys, one concept per file.

``Attention`` (attention.py), ``Mlp`` (mlp.py), ``Block``, ``LayerScale`` and ``DropPath`` (block.py) and
``PatchEmbed`` (patch_embed.py) take every argument of timm 1.0's classes of the same names, in the same
order, and do what timm does with them, so ``timm.models.VisionTransformer(block_fn=Block,
embed_layer=PatchEmbed)`` builds the same modules, initialises them the same way and computes the same outputs
as timm's own. They also take the older keywords the official MAE code passes (``qk_scale=``, ``drop=``), so
timm and official checkpoints load with ``strict=True``. What they do not support is refused with an error
that names the argument.

mae_fast's additions: attention runs through a selectable backend (attn_backends.py, ``attn_backend``);
a standard Block runs through the fused ops (fused.py) where policy.py says they apply; ``PatchEmbed`` embeds
video clips (``num_frames``, ``t_patch_size``) and has ``forward_visible`` (only the kept patches).
"""
from .attention import Attention
from .attn_backends import (BACKENDS, attention, attn_autotune_results, attn_backend, auto_backend,
                            clear_attn_autotune, get_attn_backend, set_attn_autotune, set_attn_backend)
from .block import Block, DropPath, LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .policy import (clear_fused_choices, fused_blocks_enabled, fused_choices, fused_ops_mode, set_fused_blocks,
                     set_fused_ops, unfused_reason)

__all__ = [
    "Attention", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed",
    "BACKENDS", "attention", "attn_backend", "auto_backend", "get_attn_backend", "set_attn_backend",
    "attn_autotune_results", "clear_attn_autotune", "set_attn_autotune",
    "fused_blocks_enabled", "set_fused_blocks", "unfused_reason",
    "fused_choices", "clear_fused_choices", "fused_ops_mode", "set_fused_ops",
]
