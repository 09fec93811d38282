"""HF transformers' ViTMAEForPreTraining <-> mae_fast (official MAE layout) weights.

HF splits attention into q/k/v projections where the official model has one fused ``qkv``;
block and norm names differ too. Two HF layouts exist: the older
(``vit.encoder.layer.{i}.attention.attention.query``, ``intermediate.dense``, ...) and the newer
(``vit.layers.{i}.attention.q_proj``, ``mlp.fc1``, ...). The converters detect which one a given
HF state dict uses.

To match the official model numerically, HF must be configured with ``layer_norm_eps=1e-6``
(its default is 1e-12): :func:`vit_mae_config` does this.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch

# one entry per HF layout: block prefix templates and the names inside a block
_LAYOUTS = (
    dict(
        enc="vit.layers.{i}.", dec="decoder.decoder_layers.{i}.",
        q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", o="attention.o_proj",
        fc1="mlp.fc1", fc2="mlp.fc2", ln1="layernorm_before", ln2="layernorm_after",
    ),
    dict(
        enc="vit.encoder.layer.{i}.", dec="decoder.decoder_layers.{i}.",
        q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
        o="attention.output.dense", fc1="intermediate.dense", fc2="output.dense",
        ln1="layernorm_before", ln2="layernorm_after",
    ),
)

_TOP = {  # official name -> HF name
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def _detect_layout(hf_keys: Iterable[str]) -> dict:
    keys = set(hf_keys)
    for layout in _LAYOUTS:
        if layout["enc"].format(i=0) + layout["q"] + ".weight" in keys:
            return layout
    raise ValueError("hf state dict: unknown ViTMAE layout (no first-block query projection found)")


def _num_blocks(keys: Iterable[str], prefix: str) -> int:
    head = prefix.split("{i}")[0]
    idx = {int(k[len(head):].split(".")[0]) for k in keys if k.startswith(head)}
    return max(idx) + 1 if idx else 0


def _block_pairs(layout: dict, ours: str, theirs: str):
    """(our name, HF name) for the un-fused tensors of one block."""
    return [
        (f"{ours}norm1.{s}", f"{theirs}{layout['ln1']}.{s}") for s in ("weight", "bias")
    ] + [
        (f"{ours}norm2.{s}", f"{theirs}{layout['ln2']}.{s}") for s in ("weight", "bias")
    ] + [
        (f"{ours}attn.proj.{s}", f"{theirs}{layout['o']}.{s}") for s in ("weight", "bias")
    ] + [
        (f"{ours}mlp.fc1.{s}", f"{theirs}{layout['fc1']}.{s}") for s in ("weight", "bias")
    ] + [
        (f"{ours}mlp.fc2.{s}", f"{theirs}{layout['fc2']}.{s}") for s in ("weight", "bias")
    ]


def to_hf_state_dict(state_dict: Dict[str, torch.Tensor], hf_keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Official-layout weights -> an HF ViTMAEForPreTraining state dict (layout of ``hf_keys``)."""
    hf_keys = list(hf_keys)
    layout = _detect_layout(hf_keys)
    out = {theirs: state_dict[ours] for ours, theirs in _TOP.items()}
    for kind, n in (("blocks", _num_blocks(state_dict, "blocks.{i}.")),
                    ("decoder_blocks", _num_blocks(state_dict, "decoder_blocks.{i}."))):
        tmpl = layout["enc"] if kind == "blocks" else layout["dec"]
        for i in range(n):
            ours, theirs = f"{kind}.{i}.", tmpl.format(i=i)
            for a, b in _block_pairs(layout, ours, theirs):
                out[b] = state_dict[a]
            for s in ("weight", "bias"):
                q, k, v = state_dict[f"{ours}attn.qkv.{s}"].chunk(3, dim=0)  # fused rows are [q; k; v]
                out[f"{theirs}{layout['q']}.{s}"] = q
                out[f"{theirs}{layout['k']}.{s}"] = k
                out[f"{theirs}{layout['v']}.{s}"] = v
    return out


def from_hf_state_dict(hf_state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An HF ViTMAEForPreTraining state dict -> official-layout weights (fused qkv)."""
    layout = _detect_layout(hf_state_dict.keys())
    out = {ours: hf_state_dict[theirs] for ours, theirs in _TOP.items()}
    for kind, tmpl in (("blocks", layout["enc"]), ("decoder_blocks", layout["dec"])):
        for i in range(_num_blocks(hf_state_dict, tmpl)):
            ours, theirs = f"{kind}.{i}.", tmpl.format(i=i)
            for a, b in _block_pairs(layout, ours, theirs):
                out[a] = hf_state_dict[b]
            for s in ("weight", "bias"):
                out[f"{ours}attn.qkv.{s}"] = torch.cat(
                    [hf_state_dict[f"{theirs}{layout[x]}.{s}"] for x in ("q", "k", "v")], dim=0
                )
    return out


def vit_mae_config(model, **overrides):
    """A transformers ViTMAEConfig with the shapes of a mae_fast/official ``MaskedAutoencoderViT``."""
    from transformers import ViTMAEConfig

    pe = model.patch_embed
    H, W = pe.img_size
    if H != W:
        raise ValueError(f"HF ViTMAE needs square images; the model has img_size {pe.img_size}")
    D = model.cls_token.shape[-1]
    Dd = model.mask_token.shape[-1]
    blk, dblk = model.blocks[0], model.decoder_blocks[0]
    cfg = dict(
        hidden_size=D,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=model.norm.eps,
        image_size=H,
        patch_size=pe.patch_size[0],
        num_channels=pe.in_chans,
        qkv_bias=blk.attn.qkv.bias is not None,
        decoder_hidden_size=Dd,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dblk.attn.num_heads,
        decoder_intermediate_size=dblk.mlp.fc1.out_features,
        norm_pix_loss=bool(model.norm_pix_loss),
    )
    cfg.update(overrides)
    return ViTMAEConfig(**cfg)
