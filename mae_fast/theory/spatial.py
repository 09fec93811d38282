"""Spatial-scale measures of a linear map between flattened images.

W is [d, d] with x_hat = x W: W[i, j] is the weight from input entry i to output entry j. For colour
(d = h*w*C, channel last) the weights are summed over channel pairs first, so every measure is about
pixel positions. All distances are in pixels of the (h, w) grid. docs/THEORY.md says why each measure
is defined as it is.

- ``spatial_scale``: energy-weighted (W_ij^2) mean distance, outside-patch share, decay length.
- ``data_basis`` / ``on_data``: the map restricted to the input directions the images carry, for the
  same measures "weighted by the data".
- ``jacobian_profile`` / ``jacobian_decay``: mean |W_ij| against distance and its exponential fit.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_POWER = 0.99  # share of the image power (tr S) the data-weighted measures keep
ZERO_REL = 1e-12  # profile bins below this share of the largest bin are rounding, not weight


@dataclass(frozen=True)
class SpatialScale:
    mean_distance: float  # sum W_ij^2 dist(i, j) / sum W_ij^2
    outside_patch_fraction: float  # share of sum W_ij^2 with i and j in different patches
    decay_length: float  # l in rms W(r) ~ a exp(-r / l) (see decay_length); inf: no decay within the image
    uniform_mean_distance: float = math.nan  # mean_distance of a uniform map on the same grid

    @property
    def saturated(self) -> bool:
        """True when the map is no more local than a uniform one (mean distance >= the uniform map's)."""
        return self.mean_distance >= self.uniform_mean_distance

    def as_dict(self) -> dict:
        return asdict(self)


def as_pair(image_size) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size: expected (h, w) or an int, got {image_size!r}") from None
    return h, w


def pixel_weights(W, image_size, absolute: bool = False) -> np.ndarray:
    """W^2 (or |W| with ``absolute``) summed over channel pairs: [h*w, h*w]."""
    W = np.asarray(W, dtype=np.float64)
    W = np.abs(W) if absolute else np.square(W)
    h, w = as_pair(image_size)
    n = h * w
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] % n:
        raise ValueError(f"W: expected a square [h*w*C, h*w*C] map for image_size {(h, w)}, got {W.shape}")
    c = W.shape[0] // n
    if c == 1:
        return W
    return W.reshape(n, c, n, c).sum(axis=(1, 3))  # [n, n]


def _grid(image_size):
    return _grid_cached(*as_pair(image_size))


@functools.lru_cache(maxsize=4)
def _grid_cached(h: int, w: int):
    rows, cols = np.divmod(np.arange(h * w), w)  # [h*w]
    dist = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])  # [n, n]
    rbin = np.rint(dist).astype(np.int64).ravel()  # [n*n]
    for a in (rows, cols, dist, rbin):
        a.flags.writeable = False
    return rows, cols, dist, rbin


@functools.lru_cache(maxsize=16)
def uniform_mean_distance(h: int, w: int) -> float:
    """Mean distance between two pixels drawn uniformly from an (h, w) grid (16.68 for 32 x 32)."""
    return float(_grid_cached(h, w)[2].mean())


def distance_profile(W, image_size, absolute: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean W^2 (or |W|) over pixel pairs at each rounded distance r = 0, 1, ...: (r, mean, count)."""
    return _profile(pixel_weights(W, image_size, absolute), as_pair(image_size))


def _profile(P, image_size):
    r = _grid(image_size)[3]
    count = np.bincount(r)
    total = np.bincount(r, weights=P.ravel())
    keep = count > 0
    radii = np.arange(len(count))[keep]
    return radii, total[keep] / count[keep], count[keep]


def decay_length(W, image_size) -> float:
    """Decay length of the map W ([d, d]) from its rms profile; see _decay."""
    return _decay(pixel_weights(W, image_size), as_pair(image_size), root=True)


def _decay(P, image_size, root: bool) -> float:
    """Fitted decay length: count-weighted least squares of log f(r) = a - r / l over 1 <= r <= min(h, w)/2,
    where f(r) is the mean of P over pixel pairs at rounded distance r (its square root if ``root``: rms).

    Bins below ZERO_REL of the largest bin are rounding and skipped. Returns 0 when all weight sits at
    r = 0 (the identity), inf when the profile does not decay within the image (slope >= 0, or a fitted
    l longer than the image side) and nan when fewer than two bins are usable.
    """
    h, w = image_size
    radii, mean, count = _profile(P, image_size)
    nonzero = mean > ZERO_REL * mean.max() if mean.max() > 0 else np.zeros_like(mean, dtype=bool)
    if not nonzero[radii >= 1].any() and nonzero[radii == 0].any():
        return 0.0
    sel = (radii >= 1) & (radii <= max(1, min(h, w) // 2)) & nonzero
    if sel.sum() < 2:
        return math.nan
    y = np.log(mean[sel]) * (0.5 if root else 1.0)
    x, wt = radii[sel].astype(np.float64), count[sel].astype(np.float64)
    xm = np.sum(wt * x) / wt.sum()
    ym = np.sum(wt * y) / wt.sum()
    slope = np.sum(wt * (x - xm) * (y - ym)) / np.sum(wt * (x - xm) ** 2)
    length = -1.0 / slope if slope < 0 else math.inf
    return math.inf if length > max(h, w) else float(length)


def jacobian_profile(W, image_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean |W_ij| over pixel pairs at each rounded distance r: (r, mean, count) (the map's Jacobian)."""
    return distance_profile(W, image_size, absolute=True)


def jacobian_decay(W, image_size) -> float:
    """l in mean |W|(r) ~ a exp(-r / l), fitted as ``decay_length`` is (0: identity, inf: > image side)."""
    return _decay(pixel_weights(W, image_size, absolute=True), as_pair(image_size), root=False)


def spatial_scale(W, image_size, patch_size: int) -> SpatialScale:
    """Mean distance, outside-patch fraction and decay length of the map W ([d, d])."""
    h, w = as_pair(image_size)
    P = pixel_weights(W, (h, w))  # [n, n]
    rows, cols, dist, _ = _grid((h, w))
    total = P.sum()
    uniform = uniform_mean_distance(h, w)
    if total == 0:
        return SpatialScale(0.0, 0.0, math.nan, uniform)
    pid = (rows // patch_size) * (w // patch_size) + cols // patch_size  # [n]
    outside = P[pid[:, None] != pid[None, :]].sum()
    return SpatialScale(mean_distance=float((P * dist).sum() / total),
                        outside_patch_fraction=float(outside / total),
                        decay_length=_decay(P, (h, w), root=True), uniform_mean_distance=uniform)


def data_basis(S, power: float = DEFAULT_POWER) -> np.ndarray:
    """Orthonormal top principal directions of S ([d, q]) that together hold ``power`` of tr S."""
    if not (0.0 < power <= 1.0):
        raise ValueError(f"power: expected a share in (0, 1], got {power!r}")
    evals, vecs = np.linalg.eigh(np.asarray(S, dtype=np.float64))
    evals, vecs = np.clip(evals[::-1], 0.0, None), vecs[:, ::-1]
    share = np.cumsum(evals) / evals.sum()
    q = min(len(evals), int(np.searchsorted(share, power - 1e-12)) + 1)
    return vecs[:, :q].copy()


def on_data(W, basis) -> np.ndarray:
    """The map W restricted to the inputs spanned by ``basis`` ([d, q] orthonormal): Q Q^T W.

    On any input in that span it acts as W does, and it is the smallest such map (Frobenius norm)."""
    basis = np.asarray(basis, dtype=np.float64)
    return basis @ (basis.T @ np.asarray(W, dtype=np.float64))


def off_data_fraction(W, basis) -> float:
    """Share of ||W||^2 on input directions outside ``basis`` (weight the images barely exercise)."""
    W = np.asarray(W, dtype=np.float64)
    total = float(np.sum(W * W))
    if total == 0:
        return 0.0
    share = 1.0 - float(np.sum((np.asarray(basis).T @ W) ** 2)) / total
    return 0.0 if share < 1e-12 else share  # below that: rounding


def format_distance(scale: SpatialScale) -> str:
    """Mean distance for a table: the number, or 'uniform' once no more local than a uniform map."""
    return "uniform" if scale.saturated else f"{scale.mean_distance:.2f}"


def format_length(length: float) -> str:
    """Decay length for a table: the number, '> image' when it does not decay within the image."""
    if math.isnan(length):
        return "-"
    return "> image" if math.isinf(length) else f"{length:.2f}"
