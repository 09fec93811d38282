"""Linear-MAE theory: what a masking ratio and a patch size make a (linear) MAE learn.

See docs/THEORY.md. Entry points: ``linear_mae`` (closed form), ``expected_loss``,
``images_second_moment`` (S from a folder or the bundled photographs), ``spatial_scale``,
``predicted_scales`` (for ``mae-fast sweep --theory``).
"""
from .closed_form import (DEFAULT_RIDGE, LinearMAE, blockdiag, expected_loss, linear_mae, masked_second_moment,
                          patch_ids, pca, principal_angles)
from .images import folder_paths, image_matrix, images_second_moment, sample_paths, second_moment
from .scan import predicted_scales, scan
from .spatial import SpatialScale, decay_length, distance_profile, spatial_scale

__all__ = [
    "DEFAULT_RIDGE", "LinearMAE", "SpatialScale", "blockdiag", "decay_length", "distance_profile",
    "expected_loss", "folder_paths", "image_matrix", "images_second_moment", "linear_mae",
    "masked_second_moment", "patch_ids", "pca", "predicted_scales", "principal_angles", "sample_paths",
    "scan", "second_moment", "spatial_scale",
]
