"""mae_fast: fused Triton and C++/CUDA kernels for Masked Autoencoder pretraining.

Submodules: ``reference`` (the eager baseline), ``ops`` (the fused ops), ``kernels``
(Triton kernels), ``nn`` (drop-in layers), ``models`` (the fast MaskedAutoencoderViT),
``integrations.huggingface``, ``theory`` (linear-MAE predictions), ``cli`` (the ``mae-fast`` command).
``patch_model(model)`` swaps the fast pieces into an existing model.
"""
__version__ = "0.1.0"

import torch  # noqa: F401  (must load before the extension: it links against libtorch)

try:
    from . import _C  # noqa: F401  (loads the native extension; its ops register themselves)
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "mae_fast's native extension mae_fast._C is not built. From the repository run "
        f"`make setup` (or `pip install --no-build-isolation -e .`). Cause: {e}"
    ) from e

from . import ops, reference  # noqa: E402,F401
from .patching import patch_model  # noqa: E402,F401
from .train import TrainStep  # noqa: E402,F401

__all__ = ["ops", "reference", "patch_model", "TrainStep", "__version__"]
