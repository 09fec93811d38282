"""The fast MaskedAutoencoderViT: the official model's interface, built from mae_fast's ops.

Same constructor, parameter names, shapes, registration order and initialisation as the official
model (and ``mae_fast.reference``), so checkpoints and optimizer state line up. One training step:

  imgs [N, C, H, W]
  -> ops.random_masking: ids_keep [N, K], ids_restore [N, L], mask [N, L]     (one launch)
  -> PatchEmbed.forward_visible: ops.gather_patches + one GEMM on kept patches only
  -> + pos_embed at ids_keep, prepend cls + its position                      [N, 1+K, D]
  -> encoder Blocks (mae_fast.nn, attention backend selectable) -> norm
  -> decoder_embed -> ops.unshuffle_tokens (mask tokens + decoder pos_embed)  [N, 1+L, Dd]
  -> decoder Blocks -> decoder_norm -> decoder_pred
  -> ops.norm_pix_loss straight from imgs (loss and gradient in one pass)

``forward`` returns (loss, pred, mask) with pred for every patch, as the official model.
``forward_train`` returns the loss only and applies decoder_norm/decoder_pred to the removed tokens
only (the visible ones do not enter the loss): the same loss, fewer FLOPs and less memory.

Mask ratio 0 (no patch removed): the official loss divides by mask.sum() == 0. Here the loss is then
the mean over all patches (the plain autoencoder's reconstruction loss); ``mask`` is all zeros.

Video: ``num_frames=T, t_patch_size=u`` (and ``tube_masking``) as in ``mae_fast.reference``: clips
[N, C, T, H, W], space-time tubelet tokens; the same path with the tubelet-aware ops (gather_patches and
norm_pix_loss take ``t_patch_size``) and, with tube masking, the masking engine's ``frames=T/u``.

float64 models (which the fused ops do not take) run the same steps in plain torch, in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops, reference
from ..ops._common import check_indices_enabled
from ..nn import Block, PatchEmbed


class FastMAEMethods(reference.PatchLayoutMethods):
    """The fast forward of an MAE with the official attribute names and method signatures.

    Shared by :class:`MaskedAutoencoderViT` and by models patched in place (``mae_fast.patch_model``),
    which get these methods by a class swap. Needs: patch_embed (a ``mae_fast.nn.PatchEmbed``),
    cls_token, pos_embed, blocks, norm, decoder_embed, mask_token, decoder_pos_embed,
    decoder_blocks, decoder_norm, decoder_pred, norm_pix_loss.

    ``official_noise``: False (default) draws masks from the masking engine (Philox keys: seeded by
    ``torch.manual_seed``, but not the official code's masks). True draws ``noise = torch.rand(N, L)``
    (``[N, L/T]`` with tube masking) on the images' device when no noise is given, as the official
    ``random_masking`` does, so the same seed gives the official run's masks exactly. It is slower:
    an [N, L] float draw and a sort of it instead of the engine's one pass. Set it on the model
    (``model.official_noise = True``) or with ``patch_model(model, official_noise=True)``.
    """

    official_noise: bool = False

    # -- the pieces
    def _masking(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor]):
        if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
        self.patch_embed.check_input(imgs)
        # non-finite pixels would only show up as a NaN loss steps later; say so now where it is free
        # of a device sync (CPU), or when asked (MAE_FAST_CHECK_INDICES=1 on CUDA)
        if (imgs.device.type == "cpu" or check_indices_enabled()) and not torch.compiler.is_compiling():
            # a NaN/inf anywhere makes the sum non-finite (cheap); only then look element by element
            if not bool(torch.isfinite(imgs.sum(dtype=torch.float32))) and not bool(torch.isfinite(imgs).all()):
                raise ValueError("imgs contains NaN or inf values")
        return self._masks(imgs.shape[0], self.patch_embed.num_patches, mask_ratio, imgs.device, noise)

    def _masks(self, N: int, L: int, mask_ratio: float, device, noise: Optional[torch.Tensor]):
        if noise is None and self.official_noise:
            noise = torch.rand(N, L // self.mask_frames, device=device)  # the official draw
        return ops.random_masking(N, L, float(mask_ratio), device=device, noise=noise, frames=self.mask_frames)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """The official signature: x [N, L, D] -> (x_masked [N, K, D], mask [N, L], ids_restore [N, L])."""
        m = self._masks(x.shape[0], x.shape[1], mask_ratio, x.device, noise)
        if x.dtype == torch.float64:
            return torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2])), m.mask, m.ids_restore
        return ops.gather_tokens(x, m.ids_keep), m.mask, m.ids_restore

    def _encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the kept patches: [N, 1+K, D] (cls first)."""
        x = self.patch_embed.forward_visible(imgs, ids_keep)  # [N, K, D]
        x = x + self.pos_embed[0, 1:][ids_keep].to(x.dtype)  # + positions of the kept patches
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _decode_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder blocks on cls + all L tokens (mask tokens filled in): [N, 1+L, Dd], before decoder_norm."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        if x.dtype == torch.float64:
            x = _unshuffle_float64(x, ids_restore, self.mask_token, self.decoder_pos_embed)
            for blk in self.decoder_blocks:
                x = blk(x)
            return x
        # fp32 mask token and positions are added in fp32 inside the op, one rounding to x's dtype
        x = ops.unshuffle_tokens(x, ids_restore, self.mask_token,
                                 pos_embed=self.decoder_pos_embed, num_prefix=1)  # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return x

    # -- the official methods
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """(latent [N, 1+K, D], mask [N, L], ids_restore [N, L]), as the official forward_encoder."""
        m = self._masking(imgs, mask_ratio, noise)
        return self._encode(imgs, m.ids_keep), m.mask, m.ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predictions for every patch: [N, L, (u*)p*p*C], as the official forward_decoder."""
        x = self._decode_tokens(latent, ids_restore)
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))  # [N, L, p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The official loss, fused: read straight from imgs, gradient computed in the same pass."""
        if pred.dtype == torch.float64:
            return _loss_float64(pred, imgs, mask, self.patch_size, self.t_patch_size, bool(self.norm_pix_loss))
        return ops.norm_pix_loss(pred, imgs, mask, self.patch_size, norm_pix=bool(self.norm_pix_loss),
                                 t_patch_size=self.t_patch_size)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        """(loss, pred [N, L, p*p*C], mask [N, L]) as the official model."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        nothing_removed = latent.shape[1] - 1 == ids_restore.shape[1]  # mask ratio 0 (known from shapes)
        loss = self.forward_loss(imgs, pred, torch.ones_like(mask) if nothing_removed else mask)
        return loss, pred, mask

    def forward_train(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        """The loss only, with decoder_norm and decoder_pred applied to removed tokens only (same loss)."""
        if imgs.dtype == torch.float64:
            return self.forward(imgs, mask_ratio, noise)[0]
        m = self._masking(imgs, mask_ratio, noise)
        K, L = m.ids_keep.shape[1], m.ids_restore.shape[1]
        if K == L:  # nothing removed: the loss is over every patch, as in forward
            return self.forward(imgs, mask_ratio, noise)[0]
        x = self._decode_tokens(self._encode(imgs, m.ids_keep), m.ids_restore)  # [N, 1+L, Dd]
        # the removed tokens in ascending-noise order: inverse of ids_restore, ranks K..L-1
        ids_shuffle = torch.empty_like(m.ids_restore).scatter_(
            1, m.ids_restore, torch.arange(L, device=imgs.device).expand_as(m.ids_restore))  # [N, L]
        ids_masked = ids_shuffle[:, K:]  # [N, L-K]
        x = ops.gather_tokens(x[:, 1:], ids_masked)  # [N, L-K, Dd]
        pred = self.decoder_pred(self.decoder_norm(x))  # [N, L-K, p*p*C]
        return ops.norm_pix_loss(pred, imgs, None, self.patch_size, norm_pix=bool(self.norm_pix_loss),
                                 ids_masked=ids_masked, t_patch_size=self.t_patch_size)


def _unshuffle_float64(x: torch.Tensor, ids_restore: torch.Tensor, mask_token, pos_embed) -> torch.Tensor:
    """ops.unshuffle_tokens in plain torch: [N, 1+K, D] -> [N, 1+L, D], mask tokens and positions added."""
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    tokens = torch.cat([x[:, 1:], mask_token.to(x.dtype).expand(N, L + 1 - K1, D)], dim=1)  # [N, L, D]
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # [N, L, D]
    return torch.cat([x[:, :1], tokens], dim=1) + pos_embed.to(x.dtype)  # [N, 1+L, D]


def _loss_float64(pred, imgs, mask, p: int, u: int, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """ops.norm_pix_loss in plain torch: targets in (u, p-row, p-col, C) order, masked mean of the patch MSE."""
    clip = imgs if imgs.dim() == 5 else imgs.unsqueeze(2)  # [N, C, T, H, W]
    N, C, T, H, W = clip.shape
    target = clip.reshape(N, C, T // u, u, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    target = target.reshape(N, -1, u * p * p * C)  # [N, L, u*p*p*C]
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)  # [N, L]
    return (loss * mask).sum() / mask.sum()


class MaskedAutoencoderViT(FastMAEMethods, nn.Module):
    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm, norm_pix_loss: bool = False, *,
                 num_frames: int = 1, t_patch_size: int = 1, tube_masking: bool = False,
                 attn_backend: Optional[str] = None):
        super().__init__()
        # Registration order fixes named_parameters() order: it matches the official model.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames=num_frames,
                                      t_patch_size=t_patch_size)
        if tube_masking and not self.patch_embed.video:
            raise ValueError("tube_masking needs a video model (num_frames > 1)")
        self.tube_masking = tube_masking
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_backend=attn_backend)
            for _ in range(depth)
        ])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  attn_backend=attn_backend)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, t_patch_size * patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        reference.init_mae_weights(self)


def load_pretrained_encoder(model: MaskedAutoencoderViT, state_dict: dict) -> list:
    """Load an encoder-only checkpoint (the official ``mae_pretrain_vit_*.pth``, key ``"model"``).

    Every encoder tensor (cls_token, pos_embed, patch_embed, blocks, norm) must be present and
    match; decoder tensors are left as initialised. Keys that belong to neither are an error.
    Returns the names that were left as initialised (the decoder).
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    own = model.state_dict()
    decoder = {k for k in own if k.startswith(("decoder_", "mask_token"))}
    encoder = set(own) - decoder
    missing = sorted(encoder - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"state_dict is not an encoder checkpoint of this model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.load_state_dict({**{k: own[k] for k in decoder}, **state_dict}, strict=True)
    return sorted(decoder - set(state_dict))
