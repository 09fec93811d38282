"""The public ops of mae_fast: validated, autograd-aware, torch.compile-visible.

Each op has a fast path (Triton kernels / the CUDA extension) and a plain torch path beside
it, used on CPU and as the test oracle. See ``_common`` for the dispatch rule.
"""
from .tokens import gather_patches, gather_tokens, unshuffle_tokens  # noqa: F401
from .masking import Masking, random_masking  # noqa: F401
from .loss import norm_pix_loss  # noqa: F401
