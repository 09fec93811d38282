"""Linear-MAE theory: what a masking ratio and a patch size make a (linear) MAE learn.

See docs/THEORY.md. Entry points: ``linear_mae`` (closed form), ``expected_loss``, ``linear_dae``,
``images_second_moment`` (S from a folder or the bundled photographs), ``ising_covariance`` and
``power_law_covariance`` (S without data), ``spatial_scale`` / ``on_data`` (how far a map looks, over all
weights or on the data), ``predicted_scales`` (for ``mae-fast sweep --theory``), and the paper's findings
(``optimum_check``, ``ising_findings``, ``jacobian_findings``).
"""
from .closed_form import (DEFAULT_RIDGE, LinearMAE, blockdiag, denoising_loss, expected_loss, linear_dae, linear_mae,
                          masked_second_moment, patch_ids, pca, principal_angles)
from .covariances import ising_covariance, power_law_covariance
from .findings import (border_ratio, enumerated_loss, ising_findings, jacobian_claims, jacobian_findings,
                       optimum_check, paper_form_loss)
from .images import folder_paths, image_matrix, images_second_moment, sample_paths, second_moment
from .scan import predicted_scales, scan
from .spatial import (DEFAULT_POWER, SpatialScale, data_basis, decay_length, distance_profile, jacobian_decay,
                      jacobian_profile, off_data_fraction, on_data, spatial_scale, uniform_mean_distance)

__all__ = [
    "DEFAULT_POWER", "DEFAULT_RIDGE", "LinearMAE", "SpatialScale", "blockdiag", "border_ratio", "data_basis",
    "decay_length", "denoising_loss", "distance_profile", "enumerated_loss", "expected_loss", "folder_paths",
    "image_matrix", "images_second_moment", "ising_covariance", "ising_findings", "jacobian_claims",
    "jacobian_decay", "jacobian_findings", "jacobian_profile", "linear_dae", "linear_mae", "masked_second_moment",
    "off_data_fraction", "on_data", "optimum_check", "paper_form_loss", "patch_ids", "pca", "power_law_covariance",
    "predicted_scales", "principal_angles", "sample_paths", "scan", "second_moment", "spatial_scale",
    "uniform_mean_distance",
]
