"""The public ops of mae_fast: validated, autograd-aware, torch.compile-visible.

One module per op (``mae_fast/ops/<op>.py``, kernels in ``kernels/<op>.py``), each with a plain torch
implementation beside its fast path (the CPU path and the test oracle). ``path`` / ``set_path`` choose
the path of the Triton-backed ops ("auto", "torch" or "triton"). docs/OPS.md: the contracts and the design.
"""
import sys as _sys

from . import norm_pix_loss as _norm_pix_loss_module
from ._registry import PATHS, get_path, path, set_path
from .add_layer_norm import add_layer_norm
from .bias_gelu import bias_gelu
from .gather_patches import gather_patches
from .gather_tokens import gather_tokens
from .norm_pix_loss import norm_pix_loss
from .linear import linear
from .random_masking import Masking, random_masking
from .resized_crop import resized_crop
from .residual_add import residual_add
from .self_attention import self_attention
from .unshuffle_tokens import unshuffle_tokens

# the module's former name, still imported by code written against mae_fast 0.1
_sys.modules[__name__ + ".loss"] = _norm_pix_loss_module

__all__ = ["Masking", "PATHS", "add_layer_norm", "bias_gelu", "gather_patches", "gather_tokens", "get_path", "linear",
           "norm_pix_loss", "path", "random_masking", "residual_add", "resized_crop", "self_attention", "set_path",
           "unshuffle_tokens"]
