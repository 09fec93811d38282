"""The fast MaskedAutoencoderViT: the official model's interface, built from mae_fast's ops.

Same constructor, parameter names, shapes, registration order and initialisation as the official
model, so checkpoints and optimizer state line up. One training step:

  imgs [N, C, H, W]
  -> ops.random_masking: ids_keep [N, K], ids_restore [N, L], mask [N, L]     (one launch)
  -> PatchEmbed.forward_visible: ops.gather_patches + one GEMM on kept patches only
  -> + pos_embed at ids_keep, prepend cls + its position                      [N, 1+K, D]
  -> encoder Blocks (mae_fast.nn) -> norm
  -> decoder_embed -> ops.unshuffle_tokens (mask tokens + decoder pos_embed)  [N, 1+L, Dd]
  -> decoder Blocks -> decoder_norm -> decoder_pred
  -> ops.norm_pix_loss straight from imgs (loss and gradient in one pass)

``forward`` returns (loss, pred, mask) with pred for every patch, as the official model; ``forward_train``
returns the loss only and runs decoder_norm/decoder_pred on the removed tokens only (the same loss). At
mask ratio 0 the loss is the mean over all patches (the official one divides by zero). As the official model,
a ratio that keeps no patch encodes the cls token alone, and an empty batch gives a NaN loss. Video
(``num_frames=T, t_patch_size=u``, ``tube_masking``): clips [N, C, T, H, W], space-time tubelet tokens.

float64 models run the same steps, on the ops' plain torch path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops
from ..nn import Block, PatchEmbed, policy
from ..nn.fused import run_blocks
from ..nn.pos_embed import sincos_pos_embed


class FastMAEMethods:
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

    # -- the patch layout (from patch_embed)
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def in_chans(self) -> int:
        return self.patch_embed.in_chans

    @property
    def t_patch_size(self) -> int:
        return getattr(self.patch_embed, "t_patch_size", 1)

    @property
    def mask_frames(self) -> int:
        """The ``frames`` of the masking: T/u slots with tube masking, else 1."""
        return self.patch_embed.t_grid_size if getattr(self, "tube_masking", False) else 1

    def _grid(self) -> tuple:
        """(T', h, w): tubelet slots and the patch grid (T' = 1 for an image)."""
        pe = self.patch_embed
        return (pe.t_grid_size if getattr(pe, "video", False) else 1, *pe.grid_size)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, (T,) H, W] -> [N, L, (u*)p*p*C], vector order ((frame,) p-row, p-col, channel)."""
        p, u = self.patch_size, self.t_patch_size
        t, h, w = self._grid()
        v = imgs if imgs.dim() == 5 else imgs.unsqueeze(2)  # [N, C, T, H, W]
        x = v.reshape(v.shape[0], v.shape[1], t, u, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1)  # [N, t, h, w, u, p, p, C]
        return x.reshape(v.shape[0], t * h * w, u * p * p * v.shape[1])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, (u*)p*p*C] -> imgs [N, C, (T,) H, W], the inverse of :meth:`patchify`."""
        p, u, c = self.patch_size, self.t_patch_size, self.in_chans
        t, h, w = self._grid()
        v = x.reshape(x.shape[0], t, h, w, u, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)  # [N, C, t, u, h, p, w, p]
        v = v.reshape(x.shape[0], c, t * u, h * p, w * p)
        return v if getattr(self.patch_embed, "video", False) else v[:, :, 0]

    # -- the pieces
    def _masking(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor]):
        mask_ratio = ops.check_ratio("mask_ratio", mask_ratio)  # a float, numpy scalar or 0-d tensor in [0, 1)
        self.patch_embed.check_input(imgs)
        # non-finite pixels would only show up as a NaN loss steps later; say so now where it is free
        # of a device sync (CPU), or when asked (MAE_FAST_CHECK_INDICES=1 on CUDA)
        if (imgs.device.type == "cpu" or ops.check_indices_enabled()) and not ops.dispatching():
            # a NaN/inf anywhere makes the sum non-finite (cheap); only then look element by element
            if not bool(torch.isfinite(imgs.sum(dtype=torch.float32))) and not bool(torch.isfinite(imgs).all()):
                raise ValueError("imgs contains NaN or inf values")
        return self._masks(imgs.shape[0], self.patch_embed.num_patches, mask_ratio, imgs.device, noise)

    def _masks(self, N: int, L: int, mask_ratio: float, device, noise: Optional[torch.Tensor]):
        if noise is None and self.official_noise:
            noise = torch.rand(N, L // self.mask_frames, device=device)  # the official draw
        return ops.random_masking(N, L, ops.check_ratio("mask_ratio", mask_ratio), device=device, noise=noise,
                                  frames=self.mask_frames)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """The official signature: x [N, L, D] -> (x_masked [N, K, D], mask [N, L], ids_restore [N, L])."""
        m = self._masks(x.shape[0], x.shape[1], mask_ratio, x.device, noise)
        return ops.gather_tokens(x, m.ids_keep), m.mask, m.ids_restore

    def _encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor, out_dtype: Optional[torch.dtype] = None):
        """Encode the kept patches: [N, 1+K, D] (cls first), after the final norm, in ``out_dtype`` (default:
        the residual stream's, fp32 for an fp32 model under autocast, as the official model returns)."""
        x = self.patch_embed.forward_visible(imgs, ids_keep)  # [N, K, D] in the GEMM dtype
        x = x + self.pos_embed[0, 1:][ids_keep]  # + positions of the kept patches: the stream's dtype (fp32)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        return run_blocks(self.blocks, x, self.norm, out_dtype)  # blocks, then norm

    def _decode_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decoder blocks on cls + all L tokens (mask tokens filled in): [N, 1+L, Dd], before decoder_norm."""
        x = policy.linear(self.decoder_embed, latent)  # [N, 1+K, Dd] in the GEMM dtype
        # the official cat with the fp32 mask token and + fp32 positions: an fp32 stream under autocast
        stream = _promote(x.dtype, self.mask_token.dtype, self.decoder_pos_embed.dtype)
        x = ops.unshuffle_tokens(x, ids_restore, self.mask_token, pos_embed=self.decoder_pos_embed, num_prefix=1,
                                 out_dtype=stream)  # [N, 1+L, Dd]
        return run_blocks(self.decoder_blocks, x)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """decoder_norm and decoder_pred on decoder tokens x [N, M, Dd] -> [N, M, (u*)p*p*C]."""
        return policy.linear(self.decoder_pred, policy.norm(self.decoder_norm, x, policy.gemm_dtype(x)))

    # -- the official methods
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """(latent [N, 1+K, D], mask [N, L], ids_restore [N, L]), as the official forward_encoder."""
        m = self._masking(imgs, mask_ratio, noise)
        return self._encode(imgs, m.ids_keep), m.mask, m.ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predictions for every patch: [N, L, (u*)p*p*C], as the official forward_decoder."""
        x = self._decode_tokens(latent, ids_restore)
        return self._predict(x[:, 1:])  # [N, L, p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The official loss, fused: read straight from imgs, gradient computed in the same pass."""
        if pred.shape[0] == 0:  # an empty batch: NaN (0 / 0) as the official loss, zero parameter gradients
            return pred.sum(dtype=torch.float64 if pred.dtype == torch.float64 else torch.float32) * float("nan")
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
        m = self._masking(imgs, mask_ratio, noise)
        K, L = m.ids_keep.shape[1], m.ids_restore.shape[1]
        if K == L or imgs.shape[0] == 0:  # nothing removed (a loss over every patch) or no sample: as forward
            return self.forward(imgs, mask_ratio, noise)[0]
        latent = self._encode(imgs, m.ids_keep, out_dtype=policy.gemm_dtype(imgs))  # [N, 1+K, D], for decoder_embed
        x = self._decode_tokens(latent, m.ids_restore)  # [N, 1+L, Dd]
        ids_masked = m.ids_masked  # [N, L-K], the removed tokens in ascending-noise order
        pred = self._predict(ops.gather_tokens(x, ids_masked + 1))  # [N, L-K, p*p*C] (row 0 of x is cls)
        return ops.norm_pix_loss(pred, imgs, None, self.patch_size, norm_pix=bool(self.norm_pix_loss),
                                 ids_masked=ids_masked, t_patch_size=self.t_patch_size)




def _promote(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype torch's type promotion gives floats of these dtypes (fp32 for bf16 with fp16)."""
    widest = max(dtypes, key=lambda d: torch.finfo(d).bits)
    if all(d == widest or torch.finfo(d).bits < torch.finfo(widest).bits for d in dtypes):
        return widest
    return torch.float32  # two 16-bit formats






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
        init_weights(self)


def init_weights(model: nn.Module) -> None:
    """The official initialisation: fixed sin-cos position tables, the patch embedding weight
    xavier-uniform on its (out, -1) view, cls and mask tokens normal(std=0.02), every Linear xavier-uniform
    with zero bias, LayerNorm weight 1 and bias 0 (in the official order, so a seed gives the same weights)."""
    grid = model._grid() if model.patch_embed.video else model.patch_embed.grid_size
    for table in (model.pos_embed, model.decoder_pos_embed):
        table.data.copy_(sincos_pos_embed(table.shape[-1], grid).unsqueeze(0))  # [1, 1+L, D]
    w = model.patch_embed.proj.weight.data
    torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    torch.nn.init.normal_(model.cls_token, std=0.02)
    torch.nn.init.normal_(model.mask_token, std=0.02)

    def init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    model.apply(init)


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
