"""Image (and video) to patch embedding with timm 1.0's constructor and keys (timm's ``PatchEmbed``), plus
``forward_visible``: the embedding of the kept patches only."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import gather_patches
from ._common import Size2, factory, pair

_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


class PatchEmbed(nn.Module):
    """Image to patch embedding (Conv2d, kernel = stride = patch size), timm 1.0's ``PatchEmbed``.

    timm's arguments: ``norm_layer``, ``flatten`` ([N, L, D] tokens, else [N, D, h, w]), ``output_fmt``
    ("NCHW", "NHWC", "NCL", "NLC"; given, it replaces flatten), ``bias``, ``strict_img_size`` (inputs must
    have img_size; False: any size divisible by the patch), ``dynamic_img_pad`` (pad the bottom/right up
    to a multiple of the patch), ``device``/``dtype``. The image size must be given and divisible by the
    patch size.

    Video (``num_frames`` > 1 or ``t_patch_size`` > 1; not in timm): a Conv3d of kernel = stride =
    (u, p, p) on [N, C, T, H, W], tokens ordered (slot, row, col); square patches, fixed input size,
    flattened output.

    ``forward_visible(imgs, ids_keep)`` embeds only the visible patches: the raw pixels of the kept
    patches are gathered by :func:`mae_fast.ops.gather_patches` and multiplied by the conv weight as
    one GEMM. Exact, and 1/(1 - mask_ratio) fewer FLOPs than embedding every patch. (float64 images
    and non-square patches, which that op does not take, embed every patch and gather the kept ones.)
    """

    def __init__(self, img_size: Optional[Size2] = 224, patch_size: Size2 = 16, in_chans: int = 3,
                 embed_dim: int = 768, norm_layer=None, flatten: bool = True, output_fmt: Optional[str] = None,
                 bias: bool = True, strict_img_size: bool = True, dynamic_img_pad: bool = False,
                 device=None, dtype=None, *, num_frames: int = 1, t_patch_size: int = 1):
        super().__init__()
        dd = factory(device, dtype)
        if img_size is None:
            raise ValueError("img_size=None (an embedding without a fixed image size) is not supported: give img_size")
        for name, v in (("num_frames", num_frames), ("t_patch_size", t_patch_size), ("in_chans", in_chans)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_frames % t_patch_size:
            raise ValueError(f"num_frames ({num_frames}) must be a positive multiple of t_patch_size ({t_patch_size})")
        if output_fmt is not None and output_fmt not in _FORMATS:
            raise ValueError(f"output_fmt must be None or one of {_FORMATS}, got {output_fmt!r}")
        self.num_frames, self.t_patch_size = num_frames, t_patch_size
        self.video = num_frames > 1 or t_patch_size > 1
        self.t_grid_size = num_frames // t_patch_size
        self.in_chans = in_chans
        self.patch_size = tuple(int(v) for v in pair("patch_size", patch_size))
        self._set_img_size(img_size)
        if self.video:
            if self.patch_size[0] != self.patch_size[1]:
                raise ValueError(f"patch_size must be square for video, got {patch_size!r}")
            extras = dict(output_fmt=output_fmt is not None, flatten=not flatten, strict_img_size=not strict_img_size,
                          dynamic_img_pad=dynamic_img_pad)
            if any(extras.values()):
                raise ValueError(f"{', '.join(k for k, v in extras.items() if v)}: not supported for video "
                                 f"(num_frames > 1 or t_patch_size > 1)")
        self.flatten = flatten if output_fmt is None else False
        self.output_fmt = "NCHW" if output_fmt is None else str(getattr(output_fmt, "value", output_fmt))
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        if self.video:
            k = (t_patch_size, *self.patch_size)
            self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k, bias=bias, **dd)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size,
                                  bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _set_img_size(self, img_size: Size2) -> None:
        H, W = (int(v) for v in pair("img_size", img_size))
        ph, pw = self.patch_size
        if min(H, W, ph, pw) < 1:
            raise ValueError(f"img_size {(H, W)} and patch_size {(ph, pw)} must be positive")
        if H % ph or W % pw:
            raise ValueError(f"img_size {(H, W)} is not divisible by patch_size {(ph, pw)}")
        self.img_size = (H, W)
        self.grid_size = (H // ph, W // pw)
        self.num_patches = self.t_grid_size * self.grid_size[0] * self.grid_size[1]

    # -- timm's helpers
    def set_input_size(self, img_size: Optional[Size2] = None, patch_size: Optional[Size2] = None) -> None:
        """A new image size (grid and num_patches follow). A new patch size is not supported."""
        if patch_size is not None and tuple(pair("patch_size", patch_size)) != self.patch_size:
            raise NotImplementedError("set_input_size(patch_size=...): resampling the patch embedding is not supported")
        if img_size is not None:
            if self.video:
                raise ValueError("set_input_size is not supported for video")
            self._set_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid of an input of size img_size (rounded up with dynamic_img_pad)."""
        (H, W), (ph, pw) = img_size, self.patch_size
        if self.dynamic_img_pad:
            return -(-H // ph), -(-W // pw)
        return H // ph, W // pw

    # -- checks and forwards
    def input_shape(self) -> list:
        """The [N, C, (T,) H, W] this embedding takes at img_size, with N as "N"."""
        return ["N", self.in_chans, *([self.num_frames] if self.video else []), *self.img_size]

    def check_input(self, imgs: torch.Tensor) -> None:
        """imgs must be a floating tensor of shape :meth:`input_shape` (ValueError/TypeError otherwise)."""
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        expected = self.input_shape()
        if imgs.dim() != len(expected) or list(imgs.shape[1:]) != expected[1:]:
            raise ValueError(f"imgs must have shape [{', '.join(map(str, expected))}], got {list(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")

    def _check_any_size(self, imgs: torch.Tensor) -> torch.Tensor:
        """strict_img_size=False: [N, in_chans, H, W] of any size the patch divides (or padded up to one)."""
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"imgs must have shape [N, {self.in_chans}, H, W], got {list(imgs.shape)}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating-point tensor, got {imgs.dtype}")
        (ph, pw), (H, W) = self.patch_size, imgs.shape[-2:]
        if self.dynamic_img_pad:
            return F.pad(imgs, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        if H % ph or W % pw:
            raise ValueError(f"imgs size ({H}, {W}) is not divisible by patch_size {self.patch_size}")
        return imgs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """imgs x [N, C, (T,) H, W] -> tokens in ``output_fmt`` (timm's PatchEmbed.forward)."""
        if self.strict_img_size:
            self.check_input(x)  # img_size is divisible by the patch: nothing to pad
        else:
            x = self._check_any_size(x)
        x = self.proj(x)  # [N, D, (t,) h, w]
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # [N, L, D]
        elif self.output_fmt == "NHWC":
            x = x.permute(0, 2, 3, 1)  # [N, h, w, D]
        elif self.output_fmt == "NLC":
            x = x.flatten(2).transpose(1, 2)  # [N, L, D]
        elif self.output_fmt == "NCL":
            x = x.flatten(2)  # [N, D, L]
        return self.norm(x)

    def forward_visible(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Embeddings of the patches named by ``ids_keep`` [N, K] only: [N, K, D] (imgs at img_size)."""
        self.check_input(imgs)
        if imgs.dtype == torch.float64 or self.patch_size[0] != self.patch_size[1]:
            # gather_patches takes fp32/bf16/fp16 and square patches: embed every patch, keep the visible
            if not (self.flatten or self.output_fmt == "NLC"):
                raise ValueError(f"forward_visible needs token output (flatten=True or output_fmt='NLC'), "
                                 f"got output_fmt={self.output_fmt!r}")
            full = self.forward(imgs)  # [N, L, D]
            return torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))  # [N, K, D]
        # [N, K, C*(u*)p*p] in the order of the flattened conv weight: (C, (u,) p, p)
        if self.video:
            patches = gather_patches(imgs, ids_keep, self.patch_size[0], t_patch_size=self.t_patch_size)
        else:
            patches = gather_patches(imgs, ids_keep, self.patch_size[0])
        weight = self.proj.weight.flatten(1)  # [D, C*(u*)p*p]
        if patches.dtype != weight.dtype and not torch.is_autocast_enabled(imgs.device.type):
            raise TypeError(f"imgs dtype {imgs.dtype} differs from the patch embedding weight dtype {weight.dtype}")
        return self.norm(F.linear(patches, weight, self.proj.bias))  # [N, K, D]
