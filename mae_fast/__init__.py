"""mae_fast: fused Triton and C++/CUDA kernels for Masked Autoencoder pretraining.

Submodules: ``reference`` (the eager baseline), ``ops`` (the fused ops), ``kernels``
(Triton kernels), ``nn`` (drop-in layers), ``models`` (the fast MaskedAutoencoderViT),
``integrations.huggingface``, ``theory`` (linear-MAE predictions), ``tools`` (the ``mae-fast`` command).
``patch_model(model)`` swaps the fast pieces into an existing model; ``TrainStep`` runs one training step
per call.

The names above load on first use (``mae_fast.ops``, ``from mae_fast import TrainStep``): ``import mae_fast``
alone imports neither torch nor the native extension, so that ``mae-fast --help`` answers at once.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (submodule, attribute or None for the submodule itself)
_LAZY = {
    "ops": ("ops", None),
    "reference": ("reference", None),
    "patch_model": ("patching", "patch_model"),
    "TrainStep": ("train", "TrainStep"),
    "_C": ("_C", None),
}

__all__ = ["ops", "reference", "patch_model", "TrainStep", "__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import ops, reference  # noqa: F401
    from .patching import patch_model  # noqa: F401
    from .train import TrainStep  # noqa: F401


def _load_extension():
    import torch  # noqa: F401  (must load before the extension: it links against libtorch)

    try:
        return importlib.import_module("._C", __name__)  # its ops register themselves
    except ImportError as e:  # pragma: no cover - only when the package was not built
        raise ImportError(
            "mae_fast's native extension mae_fast._C is not built. From the repository run "
            f"`make setup` (or `pip install --no-build-isolation -e .`). Cause: {e}"
        ) from e


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = _load_extension() if module_name == "_C" else importlib.import_module("." + module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
