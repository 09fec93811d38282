"""The ViT MLP with timm 1.0's constructor and state_dict keys (timm's ``Mlp``)."""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from ._common import factory, pair

# Where timm defines the standard MLP (timm 1.0, and the older path): a Block given one of these as mlp_layer
# builds this module's Mlp, which computes the same.
TIMM_MLP = {("timm.layers.mlp", "Mlp"), ("timm.models.layers.mlp", "Mlp")}


class Mlp(nn.Module):
    """fc1, act, drop1, norm, fc2, drop2 (timm's ``Mlp``). ``bias`` and ``drop`` may be pairs (fc1, fc2);
    ``use_conv``: 1x1 convolutions on [N, C, H, W] instead of linear layers on [..., C]."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, norm_layer=None, bias: Union[bool, Tuple[bool, bool]] = True,
                 drop: Union[float, Tuple[float, float]] = 0.0, use_conv: bool = False, device=None, dtype=None):
        super().__init__()
        dd = factory(device, dtype)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias1, bias2 = pair("bias", bias)
        drop1, drop2 = pair("drop", drop)
        linear = partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        self.fc1 = linear(in_features, hidden_features, bias=bool(bias1), **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = linear(hidden_features, out_features, bias=bool(bias2), **dd)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
