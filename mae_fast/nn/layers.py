"""Drop-in ViT layers with timm's constructors, forward signatures and state_dict keys.

``Attention``, ``Mlp``, ``Block``, ``PatchEmbed``, ``LayerScale`` and ``DropPath`` take every argument of
timm 1.0's classes of the same names, in the same order, and do what timm does with them, so
``timm.models.VisionTransformer(block_fn=Block, embed_layer=PatchEmbed)`` builds the same modules,
initialises them the same way and computes the same outputs as timm's own. They also take the older
keywords the official MAE code passes (``qk_scale=``, ``drop=``), so timm and official checkpoints load
with ``strict=True``. What they do not support is refused with an error that names the argument.

mae_fast's additions: attention runs through :func:`mae_fast.nn.attention.attention` (a selectable
``attn_backend``); ``PatchEmbed`` embeds video clips (``num_frames``, ``t_patch_size``) and has
``forward_visible`` (only the kept patches, see its docstring).
"""
from __future__ import annotations

import sys
from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from ..ops import gather_patches
from .attention import _SDPA, BACKENDS, attention, get_attn_backend
from .fused import fused_forward, unfused_reason

Size2 = Union[int, Tuple[int, int]]

# timm's LayerNorm default (timm.layers.LayerNorm): the norm timm's Block builds when given none
DEFAULT_NORM = partial(nn.LayerNorm, eps=1e-6)

# Where timm defines the standard attention and MLP (timm 1.0, and the older paths): a Block given one
# of these classes as attn_layer / mlp_layer builds mae_fast's own, which computes the same.
_TIMM_ATTENTION = {("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")}
_TIMM_MLP = {("timm.layers.mlp", "Mlp"), ("timm.models.layers.mlp", "Mlp")}
_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


def _factory(device, dtype) -> dict:
    """The device/dtype keywords to pass on (only those given: a user's norm_layer may not take them)."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


def _pair(name: str, value) -> tuple:
    """timm's to_2tuple: a scalar is repeated, a pair is kept; anything else names the argument."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a single value or a pair, got {value!r}")
        return tuple(value)
    return (value, value)


def _class_key(cls) -> tuple:
    return (getattr(cls, "__module__", None), getattr(cls, "__qualname__", None))


# --------------------------------------------------------------------------- Attention
class Attention(nn.Module):
    """Multi-head self-attention, timm 1.0's ``Attention``: qkv, q_norm, k_norm, norm, gate, proj.

    timm's arguments: ``attn_head_dim`` (head size; default dim // num_heads), ``dim_out`` (default
    dim), ``qk_norm`` (norm_layer(head_dim) on q and k), ``scale_norm`` (norm_layer(num_heads*head_dim)
    on the attention output), ``gated`` (output times sigmoid(gate(x)), gate a Linear with qkv's bias
    setting), ``norm_layer`` (required by qk_norm and scale_norm), ``device``/``dtype``. Added:
    ``qk_scale`` (older timm: the logit scale, default head_dim**-0.5) and ``attn_backend``.
    ``forward(x, attn_mask=None, is_causal=False)``: with a mask or ``is_causal`` the attention is
    ``F.scaled_dot_product_attention`` with that mask (an SDPA ``attn_backend`` is kept; "auto" lets
    SDPA choose; "xformers" and "mae_fast" are refused).
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None, *,
                 qk_scale: Optional[float] = None, attn_backend: Optional[str] = None):
        super().__init__()
        dd = _factory(device, dtype)
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) "
                                 f"unless attn_head_dim is given")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        if attn_backend is not None and attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be None or one of {BACKENDS}, got {attn_backend!r}")
        dim_out = dim_out or dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = qk_scale if qk_scale is not None else attn_head_dim**-0.5
        self.attn_backend = attn_backend
        # registration order = timm's (state_dict order): qkv, q_norm, k_norm, norm, gate, proj
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        _check_tokens(x, self.qkv.in_features)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None  # [B, N, H*hd]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if attn_mask is None and not is_causal:
            x = attention(q, k, v, backend=self.attn_backend, dropout_p=dropout_p, scale=self.scale)  # [B, H, N, hd]
        else:
            x = _masked_attention(q, k, v, self.attn_backend, attn_mask, is_causal, dropout_p, self.scale)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))  # [B, N, H*hd]
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _masked_attention(q, k, v, backend: Optional[str], attn_mask, is_causal: bool, dropout_p: float, scale: float):
    """SDPA with a mask or causal flag (as timm's fused path), under the named SDPA backend if one is set."""
    name = backend if backend is not None else get_attn_backend()
    if name in ("xformers", "mae_fast"):
        raise ValueError(f"attn_mask / is_causal are not supported with attn_backend={name!r}; "
                         "use an SDPA backend or 'auto'")
    sdpa = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                   is_causal=is_causal, scale=scale)
    if name == "auto":
        return sdpa()
    with sdpa_kernel(_SDPA[name]):
        return sdpa()


# --------------------------------------------------------------------------- Mlp, LayerScale, DropPath
class Mlp(nn.Module):
    """fc1, act, drop1, norm, fc2, drop2 (timm's ``Mlp``). ``bias`` and ``drop`` may be pairs (fc1, fc2);
    ``use_conv``: 1x1 convolutions on [N, C, H, W] instead of linear layers on [..., C]."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, norm_layer=None, bias: Union[bool, Tuple[bool, bool]] = True,
                 drop: Union[float, Tuple[float, float]] = 0.0, use_conv: bool = False, device=None, dtype=None):
        super().__init__()
        dd = _factory(device, dtype)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias1, bias2 = _pair("bias", bias)
        drop1, drop2 = _pair("drop", drop)
        linear = partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        self.fc1 = linear(in_features, hidden_features, bias=bool(bias1), **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = linear(hidden_features, out_features, bias=bool(bias2), **dd)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class LayerScale(nn.Module):
    """x * gamma, gamma [dim] initialised to ``init_values`` (timm's ``LayerScale``; ``inplace``: x.mul_)."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, **_factory(device, dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``drop_prob`` (in
    training); kept samples are divided by the keep probability when ``scale_by_keep`` (timm's)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # [N, 1, ...]
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


# --------------------------------------------------------------------------- Block
class Block(nn.Module):
    """Pre-norm ViT block, timm 1.0's ``Block``: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2.

    ``x + drop_path1(ls1(attn(norm1(x))))``, then ``x + drop_path2(ls2(mlp(norm2(x))))``. timm's arguments
    and defaults (norm_layer LayerNorm with eps 1e-6; ``scale_attn_norm``/``scale_mlp_norm`` add the norms
    inside attn / mlp; ``depth`` reaches an attention layer that uses it as timm does). ``attn_layer``:
    this module's :class:`Attention` for None, "", "attn", this class or timm's ``Attention``; any other
    class is built with timm's arguments (other strings are an error: pass the class). ``mlp_layer``
    likewise (timm's ``Mlp`` becomes :class:`Mlp`). Added: ``qk_scale``, ``drop`` (older timm's name of
    proj_drop) and ``attn_backend``. ``mae_fast.nn.unfused_reason(block)`` says whether it runs
    through the fused ops (mae_fast.nn.fused) and, if not, why.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=DEFAULT_NORM, mlp_layer=None, attn_layer=None, depth: int = 0, device=None, dtype=None,
                 *, qk_scale: Optional[float] = None, drop: Optional[float] = None,
                 attn_backend: Optional[str] = None):
        super().__init__()
        dd = _factory(device, dtype)
        if drop is not None:  # older timm (and the official MAE code's era) named proj_drop `drop`
            proj_drop = drop
        attn_cls = _attention_class(attn_layer)
        mlp_cls = _mlp_class(mlp_layer)
        attn_kwargs = dict(num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
                           proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        if attn_cls is Attention:
            attn_kwargs.update(qk_scale=qk_scale, attn_backend=attn_backend)
        else:
            for name, value in (("qk_scale", qk_scale), ("attn_backend", attn_backend)):
                if value is not None:
                    raise ValueError(f"{name} is for mae_fast's Attention; attn_layer={attn_cls.__name__} does not take it")
            if _uses_depth(attn_cls):
                attn_kwargs["depth"] = depth
        mlp_kwargs = dict(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                          bias=proj_bias, drop=proj_drop, **dd)
        if scale_mlp_norm:
            mlp_kwargs["norm_layer"] = norm_layer

        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_cls(dim, **attn_kwargs)
        self.ls1 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_cls(**mlp_kwargs)
        self.ls2 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False) -> torch.Tensor:
        _check_tokens(x, self.attn.qkv.in_features)
        if attn_mask is None and not is_causal and unfused_reason(self, x) is None:
            return fused_forward(self, x)  # the same block through mae_fast's fused ops (mae_fast.nn.fused)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _attention_class(attn_layer):
    if attn_layer is None or attn_layer is Attention or _class_key(attn_layer) in _TIMM_ATTENTION:
        return Attention
    if isinstance(attn_layer, str):
        if attn_layer in ("", "attn"):
            return Attention
        raise ValueError(f"attn_layer={attn_layer!r}: mae_fast.nn.Block resolves only '' and 'attn' "
                         f"(its own Attention); pass another attention as a class")
    if not isinstance(attn_layer, type):
        raise TypeError(f"attn_layer must be None, a string or a class, got {type(attn_layer).__name__}")
    return attn_layer


def _mlp_class(mlp_layer):
    if mlp_layer is None or mlp_layer is Mlp or _class_key(mlp_layer) in _TIMM_MLP:
        return Mlp
    if not isinstance(mlp_layer, type) and not callable(mlp_layer):
        raise TypeError(f"mlp_layer must be None or a class, got {type(mlp_layer).__name__}")
    return mlp_layer


def _uses_depth(attn_cls) -> bool:
    """timm passes ``depth`` only to subclasses of its DiffAttention (which exist only once timm is imported)."""
    diff = getattr(sys.modules.get("timm.layers"), "DiffAttention", None)
    return isinstance(attn_cls, type) and diff is not None and issubclass(attn_cls, diff)


# --------------------------------------------------------------------------- PatchEmbed
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
        dd = _factory(device, dtype)
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
        self.patch_size = tuple(int(v) for v in _pair("patch_size", patch_size))
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
        H, W = (int(v) for v in _pair("img_size", img_size))
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
        if patch_size is not None and tuple(_pair("patch_size", patch_size)) != self.patch_size:
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


def _check_tokens(x: torch.Tensor, dim: int) -> None:
    """Attention and Block take tokens [B, N, dim]; anything else is a ValueError saying so."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of tokens [B, N, {dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be tokens [B, N, {dim}] (batch, tokens, dim), got shape {list(x.shape)}")
