"""Linear-MAE theory: what a masking ratio and a patch size make a (linear) MAE learn.

See docs/THEORY.md. Entry points: ``linear_mae`` (closed form), ``expected_loss``, ``linear_dae``,
``images_second_moment`` (S from a folder or the bundled photographs), ``ising_covariance`` and
``power_law_covariance`` (S without data), ``spatial_scale`` / ``on_data`` (how far a map looks, over all
weights or on the data), ``predicted_scales`` (for ``mae-fast sweep --theory``), and the paper's findings
(``optimum_check``, ``ising_findings``, ``jacobian_findings``).

The names load on first use (numpy and scipy are imported then), so that the ``mae-fast`` command can
list ``theory`` without importing them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# submodule -> the public names it holds
_EXPORTS = {
    "closed_form": ["DEFAULT_RIDGE", "LinearMAE", "blockdiag", "denoising_loss", "expected_loss", "linear_dae",
                    "linear_mae", "masked_second_moment", "patch_ids", "pca", "principal_angles"],
    "covariances": ["ising_covariance", "power_law_covariance"],
    "findings": ["border_ratio", "enumerated_loss", "ising_findings", "jacobian_claims", "jacobian_findings",
                 "optimum_check", "paper_form_loss"],
    "images": ["folder_paths", "image_matrix", "images_second_moment", "sample_paths", "second_moment"],
    "scan": ["predicted_scales", "scan"],
    "spatial": ["DEFAULT_POWER", "SpatialScale", "data_basis", "decay_length", "distance_profile", "jacobian_decay",
                "jacobian_profile", "off_data_fraction", "on_data", "spatial_scale", "uniform_mean_distance"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .closed_form import *  # noqa: F401,F403
    from .covariances import *  # noqa: F401,F403
    from .findings import *  # noqa: F401,F403
    from .images import *  # noqa: F401,F403
    from .scan import *  # noqa: F401,F403
    from .spatial import *  # noqa: F401,F403


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
