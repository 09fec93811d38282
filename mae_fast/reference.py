"""The reference MAE: the published algorithm (He et al. 2021), written plainly and eagerly.

This is the baseline for every parity test and every benchmark, and it shares no code with the fast
model. Names, constructor arguments, parameter names/shapes/registration order and initialisation
follow the official ``models_mae.py``, so official checkpoints load into it.
Blocks follow timm's layout (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``) with attention through ``F.scaled_dot_product_attention``.

Beyond the official code: non-square images (``img_size=(H, W)``), any ``in_chans``, an
optional ``noise`` argument that makes the mask reproducible (used exactly as the official
random_masking uses its uniform noise), and video.

Video (``num_frames=T``, ``t_patch_size=u``; inputs [N, C, T, H, W]): the tokens are space-time tubelets
of u frames x p x p pixels (Feichtenhofer et al. 2022, "Masked Autoencoders As Spatiotemporal Learners"),
ordered (tubelet slot s, patch row r, patch column c), L = T/u * h * w; the patch embedding is a Conv3d
(kernel = stride = (u, p, p)); the patch vector of the loss is in (u, p-row, p-col, channel) order. Masking
is random over all L tokens (as MAE-ST) or, with ``tube_masking=True``, one spatial mask per clip repeated
over the T/u slots (as VideoMAE). The position tables are fixed sin-cos, like the image MAE's: the
official 2-D table on about 3/4 of the channels and a 1-D table of the slot on the rest
(:func:`sincos_3d`; MAE-ST's separable space and time embeddings are learned, these are not). This is
mae_fast's video model: there is no official checkpoint to load into it.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import LAYER_NORM, factories

Size2 = Union[int, Tuple[int, int]]


def _pair(x: Size2) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


# --------------------------------------------------------------------------- position tables
def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos table [len(pos), embed_dim]: [sin(pos*omega), cos(pos*omega)] concatenated."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # [M, D/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def sincos_2d(embed_dim: int, grid_size: Size2, cls_token: bool = False) -> np.ndarray:
    """2-D sin-cos table [(1 +) gh*gw, embed_dim] in float64.

    Token t = row*gw + col; the first half of the channels encodes the column index, the
    second half the row index (the official layout). The cls row, if asked for, is zeros.
    """
    gh, gw = _pair(grid_size)
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos table, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)  # [L, D]
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)  # [1+L, D]
    return emb


def sincos_3d(embed_dim: int, grid_size: Tuple[int, int, int], cls_token: bool = False) -> np.ndarray:
    """Space-time sin-cos table [(1 +) t*gh*gw, embed_dim] in float64, token = (slot, row, col).

    The first ``4 * (3 * embed_dim // 16)`` channels hold the 2-D table of (row, col) (the official
    layout), the rest a 1-D table of the slot. The cls row, if asked for, is zeros.
    """
    t, gh, gw = (int(v) for v in grid_size)
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a sin-cos table, got {embed_dim}")
    d_space = 4 * (3 * embed_dim // 16)
    space = sincos_2d(d_space, (gh, gw))  # [gh*gw, d_space]
    time = sincos_1d(embed_dim - d_space, np.arange(t, dtype=np.float64))  # [t, D - d_space]
    emb = np.concatenate([np.tile(space, (t, 1)), np.repeat(time, gh * gw, axis=0)], axis=1)  # [t*gh*gw, D]
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)  # [1+L, D]
    return emb


# --------------------------------------------------------------------------- patches and masking
def patchify(imgs: torch.Tensor, patch_size: int, t_patch_size: int = 1) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, h*w, p*p*C], patch vector order (p-row, p-col, channel).

    Video [N, C, T, H, W] -> [N, T/u*h*w, u*p*p*C], tokens (slot, row, col), vector order
    (frame in tubelet, p-row, p-col, channel); u = t_patch_size.
    """
    p, u = patch_size, t_patch_size
    if imgs.dim() == 4:
        if u != 1:
            raise ValueError(f"t_patch_size={u} needs a video [N, C, T, H, W], got shape {list(imgs.shape)}")
        imgs = imgs.unsqueeze(2)  # [N, C, 1, H, W]
    N, C, T, H, W = imgs.shape
    if H % p or W % p or T % u:
        raise ValueError(f"size (T={T}, H={H}, W={W}) is not divisible by (t_patch_size={u}, patch_size={p})")
    t, h, w = T // u, H // p, W // p
    x = imgs.reshape(N, C, t, u, h, p, w, p)
    x = torch.einsum("nctuhpwq->nthwupqc", x)  # [N, t, h, w, u, p, p, C]
    return x.reshape(N, t * h * w, u * p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, image_size: Optional[Size2] = None, in_chans: int = 3,
               t_patch_size: int = 1, num_frames: Optional[int] = None) -> torch.Tensor:
    """[N, h*w, p*p*C] -> imgs [N, C, H, W]; square grid unless ``image_size=(H, W)`` is given.

    With ``num_frames`` (video): [N, T/u*h*w, u*p*p*C] -> [N, C, T, H, W].
    """
    N, L, E = x.shape
    p, u = patch_size, t_patch_size
    video = num_frames is not None
    T = num_frames if video else 1
    if not video and u != 1:
        raise ValueError("t_patch_size != 1 needs num_frames (a video)")
    if T % u:
        raise ValueError(f"num_frames {T} is not divisible by t_patch_size {u}")
    if E != u * p * p * in_chans:
        raise ValueError(f"x last dim must be t_patch_size*p*p*in_chans = {u * p * p * in_chans}, got {E}")
    t = T // u
    if image_size is None:
        h = w = int(round((L // max(t, 1)) ** 0.5))
    else:
        H, W = _pair(image_size)
        h, w = H // p, W // p
    if t * h * w != L:
        raise ValueError(f"x has {L} patches, which does not fit a {t}x{h}x{w} grid")
    x = x.reshape(N, t, h, w, u, p, p, in_chans)
    x = torch.einsum("nthwupqc->nctuhpwq", x)  # [N, C, t, u, h, p, w, p]
    x = x.reshape(N, in_chans, T, h * p, w * p)
    return x if video else x[:, :, 0]


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), the official truncation."""
    return int(num_tokens * (1 - mask_ratio))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None, frames: int = 1):
    """Per-sample random masking by argsort of uniform noise (small noise = kept).

    x [N, L, D] -> (x_masked [N, K, D], mask [N, L] (1 = removed), ids_restore [N, L], ids_keep [N, K]).
    ``noise`` [N, L], if given, is used as is.

    Tube masking (``frames=T`` > 1, tokens ordered [T, L/T]): one spatial mask per sample from noise
    [N, L/T], repeated over the T slots; K = T * int(L/T * (1 - mask_ratio)). Kept tokens are listed
    slot by slot, each slot's in ascending noise; the removed ones follow, slot by slot, likewise.
    """
    N, L, D = x.shape
    if frames == 1:
        K = num_kept(L, mask_ratio)
        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # [N, L]
        ids_shuffle = torch.argsort(noise, dim=1)  # [N, L]
    else:
        if L % frames:
            raise ValueError(f"L={L} tokens do not split into frames={frames} slots")
        S = L // frames
        Ks = num_kept(S, mask_ratio)
        K = frames * Ks
        if noise is None:
            noise = torch.rand(N, S, device=x.device)  # [N, L/T]
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # [N, S]
        slot = torch.arange(frames, device=x.device).view(1, frames, 1)  # [1, T, 1]
        key = (rank >= Ks).long()[:, None, :] * L + slot * S + rank[:, None, :]  # (removed, slot, noise rank)
        ids_shuffle = torch.argsort(key.reshape(N, L), dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    ids_keep = ids_shuffle[:, :K]  # [N, K]
    x_masked = gather_visible(x, ids_keep)  # [N, K, D]
    mask = torch.ones(N, L, device=x.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [N, L]
    return x_masked, mask, ids_restore, ids_keep


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: Optional[torch.Tensor] = None,
                   prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The encoder input as the official code builds it: x [N, L, D] (+ pos_embed [1, L, D] on every
    token), the tokens at ids_keep [N, K] by an index-repeat gather, prefix rows [1, P, D] in front."""
    N, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed  # [N, L, D]
    out = torch.gather(x, 1, ids_keep.long().unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
    if prefix is not None:
        out = torch.cat([prefix.expand(N, -1, -1), out], dim=1)  # [N, P+K, D]
    return out


def decoder_input(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                  pos_embed: Optional[torch.Tensor] = None, num_prefix: int = 1) -> torch.Tensor:
    """The decoder input as the official code builds it: x [N, P+K, D] -> mask tokens appended, the
    tokens unshuffled by ids_restore [N, L], the prefix rows put back, + pos_embed [1, P+L, D]."""
    N, T_in, D = x.shape
    P, L = num_prefix, ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).repeat(N, L + P - T_in, 1)  # [N, L-K, D]
    x_ = torch.cat([x[:, P:], mask_tokens], dim=1)  # [N, L, D]
    x_ = torch.gather(x_, 1, ids_restore.long().unsqueeze(-1).repeat(1, 1, D))  # unshuffle, [N, L, D]
    out = torch.cat([x[:, :P], x_], dim=1)  # [N, P+L, D]
    return out if pos_embed is None else out + pos_embed


def visible_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, t_patch_size: int = 1) -> torch.Tensor:
    """The raw pixels a visible-only patch embedding takes: imgs [N, C, (T,) H, W] cut into (tubelet) patches
    in the (C, (u,) p, p) order of the flattened conv weight, then the rows at ids_keep [N, K]."""
    p, u = patch_size, t_patch_size
    if imgs.dim() == 4:
        cols = F.unfold(imgs, kernel_size=p, stride=p).transpose(1, 2)  # [N, L, C*p*p]
    else:
        N, C = imgs.shape[:2]
        tubes = imgs.unfold(2, u, u).unfold(3, p, p).unfold(4, p, p)  # [N, C, T', h, w, u, p, p]
        cols = tubes.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(N, -1, C * u * p * p)  # [N, L, C*u*p*p]
    return torch.gather(cols, 1, ids_keep.long().unsqueeze(-1).repeat(1, 1, cols.shape[-1]))  # [N, K, C*u*p*p]


def patch_loss(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = False,
    eps: float = 1e-6,
    t_patch_size: int = 1,
) -> torch.Tensor:
    """The official forward_loss: mean squared error per patch, averaged over removed patches.

    imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] (1 = counted). With norm_pix_loss each
    target patch is normalised by its own mean and unbiased variance: (t - mean) / sqrt(var + eps).
    Video: imgs [N, C, T, H, W], pred [N, L, u*p*p*C] in :func:`patchify`'s order.
    """
    target = patchify(imgs, patch_size, t_patch_size)  # [N, L, (u*)p*p*C]
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased
        target = (target - mean) / (var + eps) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L]
    return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- timm-style layers
class PatchEmbed(nn.Module):
    """Image to patch embeddings with a Conv2d of kernel = stride = patch_size (timm's layout).

    Video (``num_frames`` > 1 or ``t_patch_size`` > 1): a Conv3d of kernel = stride = (u, p, p) on
    [N, C, T, H, W], tokens (slot, row, col).
    """

    def __init__(self, img_size: Size2 = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 num_frames: int = 1, t_patch_size: int = 1, bias: bool = True):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        H, W = self.img_size
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {patch_size!r}")
        if H % p or W % p:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {p}")
        if num_frames < 1 or t_patch_size < 1 or num_frames % t_patch_size:
            raise ValueError(f"num_frames ({num_frames}) must be a positive multiple of t_patch_size ({t_patch_size})")
        self.grid_size = (H // p, W // p)
        self.num_frames, self.t_patch_size = num_frames, t_patch_size
        self.video = num_frames > 1 or t_patch_size > 1
        self.t_grid_size = num_frames // t_patch_size
        self.num_patches = self.t_grid_size * self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        if self.video:
            k = (t_patch_size, p, p)
            self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k, bias=bias)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias)
        self.norm = nn.Identity()

    def input_shape(self) -> list:
        """The [N, C, (T,) H, W] this embedding takes, with N as "N"."""
        return ["N", self.in_chans, *([self.num_frames] if self.video else []), *self.img_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.input_shape()
        if x.dim() != len(expected) or list(x.shape[1:]) != expected[1:]:
            raise ValueError(f"imgs must have shape [{', '.join(map(str, expected))}], got {list(x.shape)}")
        x = self.proj(x)  # [N, D, (t,) h, w]
        return self.norm(x.flatten(2).transpose(1, 2))  # [N, L, D]


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # [B, H, N, hd]
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, C]
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout; no layer scale or drop path)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- the model
def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def init_mae_weights(model: nn.Module) -> None:
    """The official initialisation of an MAE with the official attribute names.

    Fixed 2-D sin-cos position tables (3-D for video, :func:`sincos_3d`); patch embedding weight xavier-uniform on its (out, -1) view;
    cls and mask tokens normal(std=0.02); every Linear xavier-uniform with zero bias; LayerNorm 1/0.
    """
    pe = model.patch_embed
    for table in (model.pos_embed, model.decoder_pos_embed):
        if getattr(pe, "video", False):
            values = sincos_3d(table.shape[-1], (pe.t_grid_size, *pe.grid_size), cls_token=True)
        else:
            values = sincos_2d(table.shape[-1], pe.grid_size, cls_token=True)
        table.data.copy_(torch.from_numpy(values).float().unsqueeze(0))
    w = model.patch_embed.proj.weight.data
    torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    torch.nn.init.normal_(model.cls_token, std=0.02)
    torch.nn.init.normal_(model.mask_token, std=0.02)
    model.apply(_init_linear_and_norm)


class PatchLayoutMethods:
    """The official helpers that follow from ``patch_embed`` (patch_size, in_chans, patchify, unpatchify)
    plus the video ones (t_patch_size, mask_frames). The fast model has its own copy
    (``mae_fast.models.mae``), so that the reference stays the plain code it is compared against."""

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

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size, self.t_patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        pe = self.patch_embed
        return unpatchify(x, self.patch_size, pe.img_size, self.in_chans, self.t_patch_size,
                          pe.num_frames if getattr(pe, "video", False) else None)


class MaskedAutoencoderViT(PatchLayoutMethods, nn.Module):
    """Masked Autoencoder with a ViT backbone, as published (official constructor and names)."""

    def __init__(self, img_size: Size2 = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm,
                 norm_pix_loss: bool = False, *, num_frames: int = 1, t_patch_size: int = 1,
                 tube_masking: bool = False):
        super().__init__()
        # Registration order fixes named_parameters() order: it matches the official model.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size)
        if tube_masking and not self.patch_embed.video:
            raise ValueError("tube_masking needs a video model (num_frames > 1)")
        self.tube_masking = tube_masking
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, t_patch_size * patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    # -- init
    def initialize_weights(self):
        init_mae_weights(self)

    # -- the official methods
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        x_masked, mask, ids_restore, _ = random_masking(x, mask_ratio, noise, self.mask_frames)
        return x_masked, mask, ids_restore

    # -- forward
    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        x = self.patch_embed(x)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, K, D]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # [1, 1, D]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [N, 1+K, D]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, 1+K, Dd]
        x = decoder_input(x, ids_restore, self.mask_token, self.decoder_pos_embed)  # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1+L, (u*)p*p*C]
        return x[:, 1:, :]  # [N, L, (u*)p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return patch_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss, t_patch_size=self.t_patch_size)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# --------------------------------------------------------------------------- factories
_LN = LAYER_NORM
MODELS = factories(MaskedAutoencoderViT)
mae_vit_base_patch16_dec512d8b = MODELS["mae_vit_base_patch16_dec512d8b"]
mae_vit_large_patch16_dec512d8b = MODELS["mae_vit_large_patch16_dec512d8b"]
mae_vit_huge_patch14_dec512d8b = MODELS["mae_vit_huge_patch14_dec512d8b"]
mae_vit_tiny_patch8_dec128d2b = MODELS["mae_vit_tiny_patch8_dec128d2b"]
mae_vit_base_patch16 = MODELS["mae_vit_base_patch16"]
mae_vit_large_patch16 = MODELS["mae_vit_large_patch16"]
mae_vit_huge_patch14 = MODELS["mae_vit_huge_patch14"]
mae_vit_tiny_patch8 = MODELS["mae_vit_tiny_patch8"]


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build a reference model by factory name (official names, short aliases, or the tiny config)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
