"""patch_model(): swap mae_fast's fast pieces into an existing model, in place, weights kept.

What is swapped, only where it is known to compute the same thing:

- **Blocks.** A module whose class is exactly timm's ViT ``Block`` (``timm.models.vision_transformer.Block``)
  or ``mae_fast.reference.Block``, whose ``attn`` is exactly timm's standard ``Attention`` (or the
  reference's), and which holds nothing else (no extra parameters, buffers, submodules, hooks or
  instance-level ``forward``), becomes a :class:`mae_fast.nn.Block`. The new block holds the very same
  submodules (norms, mlp, layer scales, drop paths, and qkv, q_norm, k_norm, norm, gate, proj of the
  attention): parameters are the same objects, so an optimizer built before the patch keeps working.
  Any other module is left as it is, including subclasses and the ``Block`` classes of other models
  (BEiT, SAM, Twins, Visformer, ...) and blocks with another attention (DiffAttention, ...).
- **The MAE forward.** A model with the official MAE attributes (the official ``models_mae.py``,
  ``mae_fast.reference``; see :data:`MAE_ATTRIBUTES`) whose ``patch_embed`` is timm's or the reference's
  ``PatchEmbed`` in the plain layout also gets the fast forward (masking engine, visible-only patch
  embedding, fused unshuffle and loss): its class is swapped for a subclass that adds
  :class:`mae_fast.models.mae.FastMAEMethods`. Its methods are then mae_fast's, so a class with these
  attributes is taken to have the official forward. Patched models pickle (the subclass is rebuilt from
  the original class on load).

Everything is checked before anything changes: a call that fails leaves the model untouched.
After the patch the same noise gives the same loss, pred and mask (attention dropout, when on, draws
differently). The masks of a forward without ``noise`` come from mae_fast's engine, not from
``torch.rand``; ``official_noise=True`` draws them as the official code does (see FastMAEMethods).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch.nn as nn

from .models.mae import FastMAEMethods
from .nn import Attention, Block, PatchEmbed

MAE_ATTRIBUTES = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token",
                  "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss")

# (module, qualname) of the classes whose computation mae_fast.nn reproduces
_BLOCKS = {("timm.models.vision_transformer", "Block"), ("mae_fast.reference", "Block")}
_ATTENTIONS = {("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention"),
               ("mae_fast.reference", "Attention")}
_PATCH_EMBEDS = {("timm.layers.patch_embed", "PatchEmbed"), ("timm.models.layers.patch_embed", "PatchEmbed"),
                 ("mae_fast.reference", "PatchEmbed")}
_BLOCK_CHILDREN = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2", "drop_path"}
_ATTN_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")

_log = logging.getLogger(__name__)
_PATCHED_CLASSES: dict = {}


def _key(obj) -> Tuple[str, str]:
    cls = type(obj)
    return cls.__module__, cls.__qualname__


def _plain_module(m: nn.Module, what: str, children: set) -> Optional[str]:
    """Why ``m`` holds more than the listed children (None if it does not)."""
    if m._parameters or m._buffers:
        return f"{what} has its own parameters/buffers ({', '.join([*m._parameters, *m._buffers])})"
    extra = set(m._modules) - children
    if extra:
        return f"{what} has extra submodules ({', '.join(sorted(extra))})"
    if any(getattr(m, h, None) for h in _HOOKS):
        return f"{what} has hooks"
    if "forward" in m.__dict__:
        return f"{what} has an instance-level forward"
    return None


def _attention_refusal(attn) -> Optional[str]:
    if _key(attn) not in _ATTENTIONS:
        return f"attn is a {type(attn).__module__}.{type(attn).__qualname__}"
    why = _plain_module(attn, "attn", _ATTN_CHILDREN)
    if why:
        return why
    qkv, proj, gate = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "gate", None)
    if type(qkv) is not nn.Linear or type(proj) is not nn.Linear or gate is not None and type(gate) is not nn.Linear:
        return "attn.qkv / attn.proj / attn.gate are not plain nn.Linear"
    heads = getattr(attn, "num_heads", None)
    if not isinstance(heads, int) or heads < 1 or qkv.out_features % (3 * heads):
        return "attn.num_heads does not split attn.qkv"
    head_dim = qkv.out_features // (3 * heads)
    if getattr(attn, "head_dim", head_dim) != head_dim or proj.in_features != heads * head_dim:
        return "attn.head_dim does not match attn.qkv / attn.proj"
    if not isinstance(getattr(attn, "attn_drop", None), (nn.Dropout, float, int)):
        return "attn.attn_drop is neither a Dropout nor a float"
    return None


def block_refusal(m: nn.Module) -> Optional[str]:
    """Why :func:`patch_model` leaves block ``m`` alone; None when it swaps it."""
    if _key(m) not in _BLOCKS:
        return f"{type(m).__module__}.{type(m).__qualname__} is not timm's ViT Block"
    why = _plain_module(m, "block", _BLOCK_CHILDREN)
    if why:
        return why
    if not all(a in m._modules for a in ("norm1", "attn", "norm2", "mlp")):
        return "block lacks norm1/attn/norm2/mlp"
    if "drop_path" in m._modules and ({"drop_path1", "drop_path2", "ls1", "ls2"} & set(m._modules)):
        return "block mixes the old (drop_path) and new (drop_path1/2, ls1/2) layouts"
    return _attention_refusal(m.attn)


def _fast_attention(attn, attn_backend: Optional[str]) -> Attention:
    """An mae_fast Attention around attn's own modules (nothing allocated, no RNG drawn)."""
    qkv, heads = attn.qkv, attn.num_heads
    head_dim = qkv.out_features // (3 * heads)
    gate = getattr(attn, "gate", None)
    # a shell with the same submodules, so that they register in timm's order (parameters, state_dict)
    new = Attention(qkv.in_features, heads, attn_head_dim=head_dim, gated=gate is not None, attn_backend=attn_backend,
                    device="meta")
    new.qkv, new.proj = qkv, attn.proj
    for name in ("q_norm", "k_norm", "norm", "proj_drop"):
        if isinstance(getattr(attn, name, None), nn.Module):
            setattr(new, name, getattr(attn, name))
    new.gate = gate
    drop = attn.attn_drop  # a Dropout module (timm) or a float (reference)
    new.attn_drop = nn.Dropout(drop.p if isinstance(drop, nn.Dropout) else float(drop))
    # timm 1.0's fused path calls SDPA without a scale (head_dim**-0.5); its other path and older timm use .scale
    new.scale = head_dim**-0.5 if getattr(attn, "fused_attn", False) else float(attn.scale)
    return new.train(attn.training)


def _fast_block(old: nn.Module, attn_backend: Optional[str]) -> Block:
    new = Block(old.attn.qkv.in_features, 1, device="meta")  # a shell: every submodule is replaced below
    new.attn = _fast_attention(old.attn, attn_backend)
    new.norm1, new.norm2, new.mlp = old.norm1, old.norm2, old.mlp
    for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
        if name in old._modules:
            setattr(new, name, old._modules[name])
    if "drop_path" in old._modules:  # older timm: one module for both branches
        new.drop_path1 = new.drop_path2 = old.drop_path
    if any(t.is_meta for t in (*new.parameters(), *new.buffers())):  # pragma: no cover - a bug here, not the user's
        raise RuntimeError("patch_model: a swapped block kept a placeholder tensor")
    return new.train(old.training)


def patch_embed_refusal(pe: nn.Module) -> Optional[str]:
    """Why the patch embedding ``pe`` is not swapped for a :class:`mae_fast.nn.PatchEmbed`; None when it is."""
    if isinstance(pe, PatchEmbed):
        return None
    if _key(pe) not in _PATCH_EMBEDS:
        return f"patch_embed is a {type(pe).__module__}.{type(pe).__qualname__}"
    why = _plain_module(pe, "patch_embed", {"proj", "norm"})
    if why:
        return why
    proj = getattr(pe, "proj", None)
    video = getattr(pe, "video", False)
    if type(proj) is not (nn.Conv3d if video else nn.Conv2d):
        return "patch_embed.proj is not a plain convolution"
    p = tuple(getattr(pe, "patch_size", ()))
    if len(p) != 2 or p[0] != p[1]:
        return f"patch_embed.patch_size {p} is not a square patch"
    k = ((getattr(pe, "t_patch_size", 1),) if video else ()) + p
    if (tuple(proj.kernel_size) != k or tuple(proj.stride) != k or any(proj.padding) or set(proj.dilation) != {1}
            or proj.groups != 1 or proj.padding_mode != "zeros"):
        return "patch_embed.proj is not a kernel = stride = patch convolution"
    img = getattr(pe, "img_size", None)
    if img is None or len(img) != 2 or img[0] % p[0] or img[1] % p[1]:
        return f"patch_embed.img_size {img} is not a size the patch divides"
    if (not getattr(pe, "flatten", True) or getattr(pe, "dynamic_img_pad", False)
            or not getattr(pe, "strict_img_size", True) or getattr(pe, "output_fmt", "NCHW") != "NCHW"):  # timm's Format is a str enum
        return "patch_embed is not in the plain layout (flatten, fixed image size, no padding)"
    return None


def _fast_patch_embed(old: nn.Module) -> PatchEmbed:
    if isinstance(old, PatchEmbed):
        return old
    proj = old.proj
    new = PatchEmbed(old.img_size, old.patch_size, proj.in_channels, proj.out_channels, bias=proj.bias is not None,
                     num_frames=getattr(old, "num_frames", 1), t_patch_size=getattr(old, "t_patch_size", 1),
                     device="meta")
    new.proj = proj
    if isinstance(old._modules.get("norm"), nn.Module):
        new.norm = old.norm
    return new.train(old.training)


def is_official_mae(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in MAE_ATTRIBUTES)


def _mae_refusal(model: nn.Module) -> Optional[str]:
    why = patch_embed_refusal(model.patch_embed)
    if why:
        return why
    pe = model.patch_embed
    L = pe.num_patches if isinstance(pe, PatchEmbed) else (
        getattr(pe, "t_grid_size", 1) * pe.img_size[0] // pe.patch_size[0] * pe.img_size[1] // pe.patch_size[1])
    D, C, p = pe.proj.out_channels, pe.proj.in_channels, pe.patch_size[0]
    u = getattr(pe, "t_patch_size", 1)
    dd = getattr(model.decoder_embed, "out_features", None)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + L, D), "mask_token": (1, 1, dd),
              "decoder_pos_embed": (1, 1 + L, dd)}
    for name, shape in shapes.items():
        if tuple(getattr(model, name).shape) != shape:
            return f"{name} has shape {tuple(getattr(model, name).shape)}, not {shape} (one cls token, {L} patches)"
    if getattr(model.decoder_pred, "out_features", None) != u * p * p * C:
        return f"decoder_pred does not predict u*p*p*C = {u * p * p * C} values per patch"
    if "forward" in model.__dict__:
        return "the model has an instance-level forward"
    return None


def _reduce_patched(self, protocol):
    base = type(self).__mae_fast_base__
    return _new_patched, (base,), self.__getstate__()


def _new_patched(base: type):
    """Unpickling: an empty instance of the patched class of ``base`` (its state follows)."""
    return object.__new__(fast_class(base))


def fast_class(base: type) -> type:
    """The patched class of ``base``: FastMAEMethods first, then ``base`` (one per base, picklable instances)."""
    cls = _PATCHED_CLASSES.get(base)
    if cls is None:
        cls = type(f"Fast{base.__name__}", (FastMAEMethods, base),
                   {"__module__": base.__module__, "__mae_fast_base__": base, "__reduce_ex__": _reduce_patched})
        _PATCHED_CLASSES[base] = cls
    return cls


def patch_model(model: nn.Module, *, attn_backend: Optional[str] = None,
                official_noise: Optional[bool] = None) -> nn.Module:
    """Swap mae_fast's blocks (and, for an official-structure MAE, its fast forward) into ``model``.

    In place; weights (the same parameter objects) kept; returns ``model``. ``attn_backend`` is given
    to every swapped block (None: the global setting, see ``mae_fast.nn.set_attn_backend``).
    ``official_noise`` (MAE models only): True draws each forward's mask noise with ``torch.rand(N, L)``
    as the official code does, so a seeded run reproduces the official masks exactly (slower); False
    uses mae_fast's masking engine (the default); None leaves the setting as it is.
    Blocks that cannot be swapped exactly are left as they are (:func:`block_refusal` says why).
    Raises ValueError, before changing anything, if nothing can be swapped or if the model has the MAE
    attributes but a layout the fast forward does not reproduce.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if official_noise is not None and not isinstance(official_noise, bool):
        raise TypeError(f"official_noise must be None or a bool, got {type(official_noise).__name__}")
    mae = is_official_mae(model)
    if mae:
        why = _mae_refusal(model)
        if why:
            raise ValueError(f"patch_model: {type(model).__name__} has the MAE attributes but {why}; "
                             f"the fast MAE forward would not compute the same")
    elif official_noise is not None:
        raise ValueError("official_noise applies to MAE models (the official attributes) only")

    swaps: List[Tuple[nn.Module, str, nn.Module]] = []
    left: List[str] = []
    for pname, parent in model.named_modules():
        if isinstance(parent, Block):
            continue  # already fast
        for name, child in parent.named_children():
            if isinstance(child, Block):
                continue
            why = block_refusal(child)
            if why is None:
                swaps.append((parent, name, child))
            elif type(child).__name__.endswith("Block"):
                left.append(f"{pname + '.' if pname else ''}{name}: {why}")
    if not swaps and not mae:
        reasons = f" ({'; '.join(left[:3])})" if left else ""
        raise ValueError(f"patch_model: {type(model).__name__} has no timm-style Block that can be swapped "
                         f"exactly{reasons} and not the official MAE structure ({', '.join(MAE_ATTRIBUTES)})")

    # -- every check passed: change the model
    new_blocks = {}
    for parent, name, child in swaps:
        if id(child) not in new_blocks:  # a block shared by two parents stays shared
            new_blocks[id(child)] = _fast_block(child, attn_backend)
        setattr(parent, name, new_blocks[id(child)])
    if left:
        _log.info("patch_model left %d block(s) as they are: %s", len(left), "; ".join(left))
    if mae:
        model.patch_embed = _fast_patch_embed(model.patch_embed)
        if not isinstance(model, FastMAEMethods):
            model.__class__ = fast_class(type(model))
        if official_noise is not None:
            model.official_noise = official_noise
    return model
