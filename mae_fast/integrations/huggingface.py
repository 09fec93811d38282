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

import types
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


# ----------------------------------------------------------------------------- patching HF in place
def _fast_embeddings_forward(self, pixel_values, noise=None, interpolate_pos_encoding=False):
    """ViTMAEEmbeddings.forward: masking engine, then the patch embedding of kept patches only."""
    from .. import ops

    if interpolate_pos_encoding:  # another image size: not accelerated, HF's own code (documented)
        return self._mae_fast_original_forward(pixel_values, noise, interpolate_pos_encoding)
    proj = self.patch_embeddings.projection
    N, C, H, W = pixel_values.shape
    if (H, W) != tuple(self.image_size) or C != proj.in_channels:
        raise ValueError(f"pixel_values must have shape [N, {proj.in_channels}, {self.image_size[0]}, "
                         f"{self.image_size[1]}], got {list(pixel_values.shape)}")
    m = ops.random_masking(N, self.patch_embeddings.num_patches, float(self.config.mask_ratio),
                           device=pixel_values.device, noise=noise)
    patches = ops.gather_patches(pixel_values.to(proj.weight.dtype), m.ids_keep, proj.kernel_size[0])  # [N, K, C*p*p]
    x = torch.nn.functional.linear(patches, proj.weight.flatten(1), proj.bias)  # [N, K, D]
    x = x + self.position_embeddings[0, 1:][m.ids_keep]
    cls = (self.cls_token + self.position_embeddings[:, :1]).expand(N, -1, -1)  # [N, 1, D]
    return torch.cat([cls, x], dim=1), m.mask, m.ids_restore  # [N, 1+K, D]


def _fast_decoder_forward(self, hidden_states, ids_restore, interpolate_pos_encoding=False, **kwargs):
    """ViTMAEDecoder.forward with the fused unshuffle (mask tokens + decoder positions in one pass)."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoderOutput

    from .. import ops

    if interpolate_pos_encoding or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return self._mae_fast_original_forward(hidden_states, ids_restore,
                                               interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    x = self.decoder_embed(hidden_states)  # [N, 1+K, Dd]
    x = ops.unshuffle_tokens(x, ids_restore, self.mask_token,
                             pos_embed=self.decoder_pos_embed, num_prefix=1)  # [N, 1+L, Dd]
    for layer in self.decoder_layers:
        out = layer(x)
        x = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
    logits = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [N, L, p*p*C]
    if kwargs.get("return_dict") is False:
        return (logits,)
    return ViTMAEDecoderOutput(logits=logits)


def _fast_pretraining_forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=None, **kwargs):
    """ViTMAEForPreTraining.forward with the fused loss (read from pixel_values, gradient in one pass)."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEForPreTrainingOutput

    from .. import ops

    if interpolate_pos_encoding or any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "head_mask")):
        return self._mae_fast_original_forward(pixel_values, noise=noise,
                                               interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    outputs = self.vit(pixel_values, noise=noise)
    latent, mask, ids_restore = outputs.last_hidden_state, outputs.mask, outputs.ids_restore
    logits = self.decoder(latent, ids_restore).logits  # [N, L, p*p*C]
    loss = ops.norm_pix_loss(logits, pixel_values, mask, self.config.patch_size, norm_pix=bool(self.config.norm_pix_loss))
    if kwargs.get("return_dict") is False:
        return (loss, logits, mask, ids_restore)
    return ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore)


def _bind(module, fn) -> None:
    if not hasattr(module, "_mae_fast_original_forward"):
        module._mae_fast_original_forward = module.forward
    module.forward = types.MethodType(fn, module)


def patch_vit_mae(model):
    """Make an HF ``ViTMAEForPreTraining`` use mae_fast's ops, in place; returns the model.

    Replaced: the masking (one launch of the masking engine), the patch embedding (kept patches
    only), the decoder's unshuffle (fused), the loss (fused). Attention stays HF's (choose it with
    ``attn_implementation``). Given the same noise, outputs equal the unpatched model's. Calls with
    ``interpolate_pos_encoding=True``, ``output_attentions`` or ``output_hidden_states`` run HF's own
    code, unaccelerated.
    """
    from transformers import ViTMAEForPreTraining

    if not isinstance(model, ViTMAEForPreTraining):
        raise TypeError(f"model must be a transformers ViTMAEForPreTraining, got {type(model).__name__}")
    _bind(model.vit.embeddings, _fast_embeddings_forward)
    _bind(model.decoder, _fast_decoder_forward)
    _bind(model, _fast_pretraining_forward)
    return model


def fast_model_from_hf(hf_model):
    """A ``mae_fast.models.MaskedAutoencoderViT`` with the config and weights of an HF ViTMAE model."""
    from functools import partial

    from ..models import MaskedAutoencoderViT

    c = hf_model.config
    D, Dd = c.hidden_size, c.decoder_hidden_size
    if c.intermediate_size * c.decoder_hidden_size != c.decoder_intermediate_size * c.hidden_size:
        raise ValueError("the encoder and decoder MLP ratios differ; MaskedAutoencoderViT has one mlp_ratio")
    if c.hidden_act != "gelu" or not c.qkv_bias:
        raise ValueError(f"only hidden_act='gelu' with qkv_bias=True converts (got {c.hidden_act!r}, qkv_bias={c.qkv_bias})")
    image_size = c.image_size if isinstance(c.image_size, int) else tuple(c.image_size)
    model = MaskedAutoencoderViT(
        img_size=image_size, patch_size=c.patch_size, in_chans=c.num_channels, embed_dim=D,
        depth=c.num_hidden_layers, num_heads=c.num_attention_heads, decoder_embed_dim=Dd,
        decoder_depth=c.decoder_num_hidden_layers, decoder_num_heads=c.decoder_num_attention_heads,
        mlp_ratio=c.intermediate_size / D, norm_layer=partial(torch.nn.LayerNorm, eps=c.layer_norm_eps),
        norm_pix_loss=bool(c.norm_pix_loss),
    )
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict()), strict=True)
    return model
