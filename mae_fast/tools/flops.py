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

Video (``num_frames`` T, ``t_patch_size`` u; counts are then per clip): the tokens are u x p x p tubelets,
L = T/u * h * w, and a patch vector has u*p*p*C values, so the Conv3d patch embedding (kernel = stride)
is a GEMM of that width, like the image one, and so is the decoder head. With tube masking one spatial
mask is repeated over the T/u slots: K = T/u * int(h*w * (1 - ratio)).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["MAEDims", "dims_of", "dims_of_config", "forward_flops", "train_flops", "flops_breakdown",
           "video_kwargs"]


@dataclass(frozen=True)
class MAEDims:
    """The sizes that fix an MAE's FLOPs (and the masking that fixes the number of kept tokens).

    ``num_frames``/``t_patch_size`` 1/1 is the image model; with ``tube_masking`` the kept-token count
    follows the tube mask (see the module docstring).
    """

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
    num_frames: int = 1
    t_patch_size: int = 1
    tube_masking: bool = False

    @property
    def video(self) -> bool:
        """Clips [N, C, T, H, W] and tubelet tokens (as ``PatchEmbed.video``)."""
        return self.num_frames > 1 or self.t_patch_size > 1

    @property
    def t_grid(self) -> int:
        """Tubelet slots along time: T/u (1 for an image)."""
        return self.num_frames // self.t_patch_size

    @property
    def spatial_patches(self) -> int:
        return (self.img_h // self.patch_size) * (self.img_w // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.t_grid * self.spatial_patches  # L = T/u * h * w

    @property
    def patch_dim(self) -> int:
        return self.t_patch_size * self.patch_size * self.patch_size * self.in_chans  # u*p*p*C

    @property
    def noise_tokens(self) -> int:
        """Length of the masking noise per sample: L/(T/u) with tube masking (one spatial noise), else L."""
        return self.spatial_patches if self.tube_masking else self.num_patches

    def input_shape(self, batch_size: int) -> tuple:
        """[N, C, H, W] for an image model, [N, C, T, H, W] for a video model."""
        return (batch_size, self.in_chans, *((self.num_frames,) if self.video else ()), self.img_h, self.img_w)

    def num_kept(self, mask_ratio: float) -> int:
        """K, the visible tokens per sample: int(L * (1 - ratio)), or T/u * int(h*w * (1 - ratio)) with tube
        masking (as ``reference.random_masking`` and the masking engine)."""
        if self.tube_masking:
            return self.t_grid * int(self.spatial_patches * (1 - mask_ratio))
        return int(self.num_patches * (1 - mask_ratio))

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
        num_frames=int(getattr(pe, "num_frames", 1)), t_patch_size=int(getattr(pe, "t_patch_size", 1)),
        tube_masking=bool(getattr(m, "tube_masking", False)),
    )


def video_kwargs(num_frames: Optional[int] = None, t_patch_size: Optional[int] = None,
                 tube_masking: bool = False) -> dict:
    """The factory keyword arguments of a video model: empty for an image model (T = u = 1, no tube
    masking), so image models are built exactly as before (and factories without video support work)."""
    T, u = int(num_frames or 1), int(t_patch_size or 1)
    if T == 1 and u == 1 and not tube_masking:
        return {}
    return {"num_frames": T, "t_patch_size": u, "tube_masking": bool(tube_masking)}


def dims_of_config(model_name: str, img_size: Optional[int] = None, patch_size: Optional[int] = None, *,
                   num_frames: Optional[int] = None, t_patch_size: Optional[int] = None,
                   tube_masking: bool = False) -> MAEDims:
    """Sizes of a reference factory config, built on the meta device (no memory, no init cost).

    ``num_frames``/``t_patch_size``/``tube_masking``: a video model (None or 1: the image model); bad
    combinations raise the reference's ValueError.
    """
    from .. import reference

    kwargs = video_kwargs(num_frames, t_patch_size, tube_masking)
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
    """Forward FLOPs per image (per clip for video) by part (patch_embed, encoder_*, decoder_embed, decoder_*,
    decoder_pred)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    L = dims.num_patches
    K = dims.num_kept(mask_ratio)
    # the Conv2d/Conv3d with kernel = stride is a GEMM [tokens, patch_dim] x [patch_dim, D]
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
    """Forward matmul FLOPs per image (per clip for video)."""
    return int(sum(flops_breakdown(dims, mask_ratio, embed_visible_only, pred_masked_only).values()))


def train_flops(dims: MAEDims, mask_ratio: float, embed_visible_only: bool = False,
                pred_masked_only: bool = False) -> int:
    """Training-step FLOPs per image (per clip for video): 3x the forward."""
    return 3 * forward_flops(dims, mask_ratio, embed_visible_only, pred_masked_only)
