"""What mae_fast's timm-compatible layers share: timm's argument helpers and the token-shape check."""
from __future__ import annotations

from functools import partial
from typing import Tuple, Union

import torch
import torch.nn as nn

Size2 = Union[int, Tuple[int, int]]

# timm's LayerNorm default (timm.layers.LayerNorm): the norm timm's Block builds when given none
DEFAULT_NORM = partial(nn.LayerNorm, eps=1e-6)


def factory(device, dtype) -> dict:
    """The device/dtype keywords to pass on (only those given: a user's norm_layer may not take them)."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


def pair(name: str, value) -> tuple:
    """timm's to_2tuple: a scalar is repeated, a pair is kept; anything else names the argument."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a single value or a pair, got {value!r}")
        return tuple(value)
    return (value, value)


def class_key(cls) -> tuple:
    return (getattr(cls, "__module__", None), getattr(cls, "__qualname__", None))


def check_tokens(x: torch.Tensor, dim: int) -> None:
    """Attention and Block take tokens [B, N, dim]; anything else is a ValueError saying so."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of tokens [B, N, {dim}], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be tokens [B, N, {dim}] (batch, tokens, dim), got shape {list(x.shape)}")
