"""Spatial scale over a grid of (mask_ratio, patch_size), and the predictions `mae-fast sweep --theory` uses."""
from __future__ import annotations

import math

import numpy as np

from .closed_form import DEFAULT_RIDGE, check_setup, linear_mae, pca
from .images import images_second_moment


MAX_SIDE = 64  # d = 4096 pixels (grayscale): the largest theory image predicted_scales builds


def _finite(x: float):
    return x if math.isfinite(x) else None


def scale_row(fit, image_size) -> dict:
    """One JSON-ready row for a LinearMAE result (inf/nan become None)."""
    return {
        "mask_ratio": fit.mask_ratio,
        "patch_size": fit.patch_size,
        "rank": fit.rank,
        "image_size": list(image_size),
        "mean_distance": fit.scale.mean_distance,
        "outside_patch_fraction": fit.scale.outside_patch_fraction,
        "decay_length": _finite(fit.scale.decay_length),
        "baseline_mean_distance": fit.baseline.mean_distance,
        "baseline_outside_patch_fraction": fit.baseline.outside_patch_fraction,
        "baseline_decay_length": _finite(fit.baseline.decay_length),
        "expected_loss": fit.expected_loss,
        "relative_loss": fit.expected_loss / fit.trace,
    }


def scan(S, image_size, mask_ratios, patch_sizes, rank: int | None, ridge: float = DEFAULT_RIDGE,
         keep_features: int = 0):
    """linear_mae at every (ratio, patch size); returns (rows, features) where features maps
    (ratio, patch) to the top ``keep_features`` feature columns ([d, f])."""
    S = np.asarray(S, dtype=np.float64)
    for p in patch_sizes:  # validate everything before the slow part
        for m in mask_ratios:
            check_setup(S.shape[0], image_size, p, m)
    rows, feats = [], {}
    Up = pca(S, S.shape[0] if rank is None else rank)  # [d, k] shared by every baseline
    for p in patch_sizes:
        for m in mask_ratios:
            fit = linear_mae(S, image_size, p, m, rank=rank, ridge=ridge, pca_features=Up)
            rows.append(scale_row(fit, image_size))
            if keep_features:
                feats[(float(m), int(p))] = fit.features[:, :keep_features].copy()
    return rows, feats


def predicted_scales(points, images=None, image_size: int | None = None, size: int = 32, rank: int = 32,
                     color: bool = False, n_samples: int | None = None, seed: int = 0) -> list[dict]:
    """Predicted spatial scale for each (mask_ratio, patch_size) point, for ``mae-fast sweep --theory DIR``.

    ``images``: a folder of images (None: the bundled sample photographs). ``image_size``: the image
    side the points refer to (e.g. 224 in a sweep). The theory runs on small images with the same patch
    grid: g = image_size // patch_size patches per side, theory patch q = max(1, round(size / g)) pixels,
    theory side g * q. Each returned dict holds the point, the theory's grid, the measures in theory
    pixels, ``mean_distance_frac`` (mean distance / theory side: comparable across points) and
    ``mean_distance_px`` (the same in pixels of ``image_size``). Without ``image_size`` the points are
    taken at ``size`` itself. A patch grid finer than MAX_SIDE per side is refused (ValueError).
    """
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # side -> (S, PCA features)
    out = []
    for m, p in points:
        p = int(p)
        if image_size is None:
            side, q = size, p
        else:
            if image_size % p:
                raise ValueError(f"patch_size: {p} does not divide the image size {image_size}")
            g = image_size // p
            q = max(1, round(size / g))
            side = g * q
            if side > MAX_SIDE:
                raise ValueError(f"patch_size: {p} gives a {g} x {g} patch grid, too fine for the theory "
                                 f"(at most {MAX_SIDE} x {MAX_SIDE} pixels; use patches of at least "
                                 f"{-(-image_size // MAX_SIDE)} pixels)")
        if side not in cache:
            S = images_second_moment(images, side, n_samples=n_samples, color=color, seed=seed)
            cache[side] = (S, pca(S, min(rank, S.shape[0])))
        S, Up = cache[side]
        fit = linear_mae(S, (side, side), q, float(m), rank=Up.shape[1], pca_features=Up)
        row = scale_row(fit, (side, side))
        row.update(mask_ratio=float(m), patch_size=p, theory_patch_size=q, theory_size=side,
                   mean_distance_frac=fit.scale.mean_distance / side,
                   mean_distance_px=fit.scale.mean_distance * (image_size or side) / side)
        out.append(row)
    return out
