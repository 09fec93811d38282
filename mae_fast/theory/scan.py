"""Spatial scale over a grid of (mask_ratio, patch_size), and the predictions `mae-fast sweep --theory` uses."""
from __future__ import annotations

import math

import numpy as np

from .closed_form import DEFAULT_RIDGE, check_setup, linear_mae
from .images import images_second_moment
from .spatial import DEFAULT_POWER, data_basis

MAX_SIDE = 64  # d = 4096 pixels (grayscale): the largest theory image predicted_scales builds
MIN_THEORY_PATCH = 2  # a 1-pixel theory patch would be pixel-wise masking, not a patch model

MEASURES = ("mean_distance", "outside_patch_fraction", "decay_length")


def _finite(x: float):
    return x if math.isfinite(x) else None


def scale_row(fit, image_size) -> dict:
    """One JSON-ready row for a LinearMAE result (inf/nan become None; see docs/THEORY.md for each key)."""
    row = {"mask_ratio": fit.mask_ratio, "patch_size": fit.patch_size, "rank": fit.rank,
           "image_size": list(image_size)}
    for prefix, scale in (("", fit.scale), ("data_", fit.data_scale), ("baseline_", fit.baseline),
                          ("baseline_data_", fit.data_baseline)):
        row.update({prefix + k: _finite(getattr(scale, k)) for k in MEASURES})
    row.update(saturated=fit.scale.saturated, data_saturated=fit.data_scale.saturated,
               uniform_mean_distance=fit.scale.uniform_mean_distance, off_data_fraction=fit.off_data_fraction,
               eigengap=_finite(fit.eigengap), expected_loss=fit.expected_loss,
               relative_loss=fit.expected_loss / fit.trace)
    return row


def _bases(S, rank: int | None, power: float):
    """(PCA features [d, k], data basis [d, q]) from one eigendecomposition of S."""
    evals, vecs = np.linalg.eigh(S)
    k = S.shape[0] if rank is None else rank
    return vecs[:, ::-1][:, :k].copy(), data_basis(S, power)  # [d, k], [d, q]


def scan(S, image_size, mask_ratios, patch_sizes, rank: int | None, ridge: float = DEFAULT_RIDGE,
         power: float = DEFAULT_POWER, keep_fits: bool = False):
    """linear_mae at every (ratio, patch size); returns (rows, fits) where fits maps (ratio, patch) to the
    LinearMAE (empty unless ``keep_fits``)."""
    S = np.asarray(S, dtype=np.float64)
    for p in patch_sizes:  # validate everything before the slow part
        for m in mask_ratios:
            check_setup(S.shape[0], image_size, p, m)
    rows, fits = [], {}
    Up, Q = _bases(S, rank, power)  # shared by every point
    for p in patch_sizes:
        for m in mask_ratios:
            fit = linear_mae(S, image_size, p, m, rank=rank, ridge=ridge, pca_features=Up, basis=Q)
            rows.append(scale_row(fit, image_size))
            if keep_fits:
                fits[(float(m), int(p))] = fit
    return rows, fits


def predicted_scales(points, images=None, image_size: int | None = None, size: int = 32, rank: int = 32,
                     color: bool = False, n_samples: int | None = None, seed: int = 0,
                     power: float = DEFAULT_POWER) -> list[dict]:
    """Predicted spatial scale for each (mask_ratio, patch_size) point, for ``mae-fast sweep --theory DIR``.

    ``images``: a folder of images (None: the bundled sample photographs). ``image_size``: the image side
    the points refer to (e.g. 224 in a sweep). The theory runs on small images with the same patch grid:
    g = image_size // patch_size patches per side, theory patch q = max(2, round(size / g)) pixels, theory
    side g * q (without ``image_size``: the points at ``size`` itself). Each row holds the point, the
    theory's grid, ``patches`` (g^2) and ``kept_patches`` (int(g^2 (1 - m)), what the real MAE keeps), the
    scan_row measures in theory pixels, and ``mean_distance_frac`` / ``data_mean_distance_frac`` (mean
    distance / theory side) and ``*_px`` (in pixels of ``image_size``). A point the theory does not apply
    to gets ``flag`` (why) and None for every measure: the MAE keeps no patch, or the patch grid needs a
    theory image wider than MAX_SIDE. A patch size that does not divide the image is a ValueError.
    """
    cache: dict[int, tuple] = {}  # side -> (S, PCA features, data basis)
    out = []
    for m, p in points:
        m, p = float(m), int(p)
        if image_size is None:
            if size % p:
                raise ValueError(f"patch_size: {p} does not divide the image size {size}")
            g, q = size // p, p
        else:
            if image_size % p:
                raise ValueError(f"patch_size: {p} does not divide the image size {image_size}")
            g = image_size // p
            q = max(MIN_THEORY_PATCH, round(size / g))
        side = g * q
        kept = int(g * g * (1 - m))  # the official truncation (mae_fast.reference)
        row = {"mask_ratio": m, "patch_size": p, "patches": g * g, "kept_patches": kept,
               "theory_patch_size": q, "theory_size": side, "flag": None}
        if kept == 0:
            row["flag"] = f"the MAE keeps no patch: int({g * g} x (1 - {m:g})) = 0"
        elif side > MAX_SIDE:
            smallest = -(-(image_size or size) // (MAX_SIDE // MIN_THEORY_PATCH))  # the finest grid that fits
            row["flag"] = (f"{g} x {g} patches of >= {MIN_THEORY_PATCH} px need a {side} px theory image "
                           f"(at most {MAX_SIDE}); use patches of at least {smallest} px")
        if row["flag"]:
            for k in ("mean_distance_frac", "mean_distance_px", "data_mean_distance_frac", "data_mean_distance_px",
                      *MEASURES, *("data_" + k for k in MEASURES)):
                row[k] = None
            out.append(row)
            continue
        if side not in cache:
            S = images_second_moment(images, side, n_samples=n_samples, color=color, seed=seed)
            cache[side] = (S, *_bases(S, min(rank, S.shape[0]), power))
        S, Up, Q = cache[side]
        fit = linear_mae(S, (side, side), q, m, rank=Up.shape[1], pca_features=Up, basis=Q)
        row.update(scale_row(fit, (side, side)), mask_ratio=m, patch_size=p)
        to_px = (image_size or side) / side
        row.update(mean_distance_frac=fit.scale.mean_distance / side, mean_distance_px=fit.scale.mean_distance * to_px,
                   data_mean_distance_frac=fit.data_scale.mean_distance / side,
                   data_mean_distance_px=fit.data_scale.mean_distance * to_px)
        out.append(row)
    return out
