"""Second moments S that need no data: the paper's Ising-like field and a stationary power-law field.

Both are for grayscale (h, w) images flattened row-major, unit variance per pixel, float64.
"""
from __future__ import annotations

import numpy as np

from .spatial import as_pair


def _offsets(image_size):
    h, w = as_pair(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size: expected positive (h, w), got {(h, w)}")
    rows, cols = np.divmod(np.arange(h * w), w)  # [h*w]
    return np.abs(rows[:, None] - rows[None, :]), np.abs(cols[:, None] - cols[None, :])  # [n, n] each


def ising_covariance(image_size, coupling: float) -> np.ndarray:
    """S_ij = tanh(J)^(|dr| + |dc|): the pixel correlations of the paper's Ising-like field ([h*w, h*w]).

    tanh(J)^distance is the exact spin correlation of a 1-d Ising chain at coupling J; the 2-d city-block
    form is a product of two such chains, so S is positive definite for every J > 0.
    """
    J = float(coupling)
    if not (J > 0 and np.isfinite(J)):
        raise ValueError(f"coupling: expected a finite J > 0, got {coupling!r}")
    dr, dc = _offsets(image_size)
    return np.tanh(J) ** (dr + dc).astype(np.float64)


def power_law_covariance(image_size, exponent: float = 2.0, period: int | None = None) -> np.ndarray:
    """Stationary field with power spectrum 1 / (|f|^2 + f0^2)^(exponent / 2) ([h*w, h*w], unit variance).

    exponent = 2 is the 1/f^2 spectrum of natural images. The field lives on a torus of side ``period``
    (default 4 max(h, w)) and S is its (h, w) window, so S is exactly stationary and positive definite
    without wrap-around between opposite image edges; f0 = 1 / period keeps the zero frequency finite.
    """
    h, w = as_pair(image_size)
    N = 4 * max(h, w) if period is None else int(period)
    if N < 2 * max(h, w):
        raise ValueError(f"period: expected at least twice the image side ({2 * max(h, w)}), got {period!r}")
    a = float(exponent)
    if not (a >= 0 and np.isfinite(a)):
        raise ValueError(f"exponent: expected a finite value >= 0, got {exponent!r}")
    f = np.fft.fftfreq(N)  # [N] cycles per pixel
    power = 1.0 / (f[:, None] ** 2 + f[None, :] ** 2 + (1.0 / N) ** 2) ** (a / 2)  # [N, N]
    acov = np.fft.ifft2(power).real  # [N, N] autocovariance on the torus
    dr, dc = _offsets((h, w))
    S = acov[dr, dc]  # [n, n] (|offset| suffices: the spectrum is even)
    return S / acov[0, 0]
