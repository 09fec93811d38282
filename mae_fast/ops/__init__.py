"""The public ops of mae_fast: validated, autograd-aware, torch.compile-visible.

One module per op (``mae_fast/ops/<op>.py``, kernels in ``kernels/<op>.py``), each with a plain torch
implementation beside its fast path (the CPU path and the test oracle). ``path`` / ``set_path`` choose
the path of the Triton-backed ops ("auto", "torch" or "triton"). docs/OPS.md: the contracts and the design.

Also here, for layers and models built on the ops: :func:`use_triton` (does an op on this tensor run its
kernels), :func:`dispatching` (is a tracer on), :func:`autocast_dtype`, and the argument checks
:func:`check_ratio` and :func:`check_indices_enabled`.
"""
from ._checks import check_indices_enabled, check_ratio
from ._tensors import autocast_dtype
from .add_layer_norm import add_layer_norm
from .bias_gelu import bias_gelu
from .gather_patches import gather_patches
from .gather_tokens import gather_tokens
from .linear import linear
from .mlp import mlp
from .norm_pix_loss import norm_pix_loss
from .paths import PATHS, dispatching, get_path, path, set_path, use_triton
from .qkv_attention import qkv_attention
from .random_masking import Masking, random_masking
from .resized_crop import resized_crop
from .residual_add import residual_add
from .self_attention import self_attention
from .unshuffle_tokens import unshuffle_tokens

__all__ = ["Masking", "PATHS", "add_layer_norm", "bias_gelu", "gather_patches", "gather_tokens", "get_path", "linear",
           "mlp", "norm_pix_loss", "path", "qkv_attention", "random_masking", "residual_add", "resized_crop",
           "self_attention", "set_path", "unshuffle_tokens", "autocast_dtype", "check_indices_enabled", "check_ratio",
           "dispatching", "use_triton"]
