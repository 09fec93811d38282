"""The closed-form linear MAE (Bisulco, Ramesh, Balestriero, Chaudhari 2025).

Data: rows x (length d) are flattened images, pixels row-major over an (h, w) grid and, for colour,
the channel last inside each pixel: index = (row * w + col) * C + channel (the order of patchify).
S is the d x d second moment of x. A mask drops each p x p patch independently with probability m
(all channels of a pixel go together). For a linear MAE x -> (r * x) A B the expected loss is

    l(A, B) = tr S - 2 (1 - m) tr(S A B) + (1 - m) tr((AB)^T V (AB)),   V = (1 - m) S + m blkdiag_p(S)

and its rank-k optimum is A B = V^-1 S U_k U_k^T with U_k the top-k eigenvectors of S V^-1 S.
All arithmetic is float64 numpy/scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from .spatial import DEFAULT_POWER, SpatialScale, as_pair, data_basis, off_data_fraction, on_data, spatial_scale

DEFAULT_RIDGE = 1e-9


def check_setup(d: int, image_size, patch_size: int, mask_ratio: float) -> tuple[int, int, int]:
    """Validate the grid, patch size and ratio for a d-dimensional S; returns (h, w, channels)."""
    h, w = as_pair(image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size: expected positive (h, w), got {(h, w)}")
    if d % (h * w) != 0:
        raise ValueError(f"S: expected d = h*w*C = {h}*{w}*C rows and columns, got d={d}")
    if not isinstance(patch_size, (int, np.integer)) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size: {patch_size} does not divide the image size {(h, w)}")
    m = float(mask_ratio)
    if not (0.0 <= m < 1.0):
        raise ValueError(f"mask_ratio: expected a value in [0, 1), got {mask_ratio!r}")
    return h, w, d // (h * w)


def patch_ids(image_size, patch_size: int, channels: int = 1) -> np.ndarray:
    """Patch index of every entry of a flattened image ([d], patches row-major over the patch grid)."""
    h, w = as_pair(image_size)
    rows, cols = np.divmod(np.arange(h * w), w)  # [h*w]
    pid = (rows // patch_size) * (w // patch_size) + cols // patch_size  # [h*w]
    return np.repeat(pid, channels)  # [d]


def blockdiag(S: np.ndarray, image_size, patch_size: int) -> np.ndarray:
    """blkdiag_p(S): S with every entry between pixels of different patches set to 0."""
    d = S.shape[0]
    h, w = as_pair(image_size)
    pid = patch_ids((h, w), patch_size, d // (h * w))  # [d]
    return np.where(pid[:, None] == pid[None, :], S, 0.0)  # [d, d]


def masked_second_moment(S: np.ndarray, image_size, patch_size: int, mask_ratio: float) -> np.ndarray:
    """V = (1 - m) S + m blkdiag_p(S); E[(r*x)^T (r*x)] = (1 - m) V for kept-mask r."""
    m = float(mask_ratio)
    return (1.0 - m) * S + m * blockdiag(S, image_size, patch_size)  # [d, d]


def _check_S(S) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S: expected a square d x d matrix, got shape {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError("S: expected finite values, got NaN or inf")
    scale = max(np.abs(S).max(), 1e-300)
    if np.abs(S - S.T).max() > 1e-8 * scale:
        raise ValueError("S: expected a symmetric matrix (a second moment X^T X)")
    return (S + S.T) / 2


def expected_loss(S, A, B, image_size, patch_size: int, mask_ratio: float) -> float:
    """The objective E_r ||x - (r * x) A B||^2 for data with second moment S (any A: d x k, B: k x d)."""
    S = _check_S(S)
    d = S.shape[0]
    check_setup(d, image_size, patch_size, mask_ratio)
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != d or B.shape[1] != d or A.shape[1] != B.shape[0]:
        raise ValueError(f"A, B: expected shapes (d, k) and (k, d) with d={d}, got {A.shape} and {B.shape}")
    m = float(mask_ratio)
    V = masked_second_moment(S, image_size, patch_size, m)  # [d, d]
    W = A @ B  # [d, d]
    return float(np.trace(S) - 2 * (1 - m) * np.sum(S * W.T) + (1 - m) * np.sum(W * (V @ W)))


@dataclass
class LinearMAE:
    """The optimum of a linear MAE for one (mask_ratio, patch_size, rank)."""

    features: np.ndarray  # [d, k] orthonormal: top-k eigenvectors of S V^-1 S, largest first
    eigenvalues: np.ndarray  # [k] matching eigenvalues of S V^-1 S
    encoder: np.ndarray  # [d, k] A = V^-1 S U_k
    decoder: np.ndarray  # [k, d] B = U_k^T
    full_map: np.ndarray  # [d, d] V^-1 S (the full-rank optimum)
    expected_loss: float  # objective at (encoder, decoder)
    trace: float  # tr S (the loss of predicting zero)
    image_size: tuple[int, int]
    patch_size: int
    mask_ratio: float
    scale: SpatialScale  # spatial scale of the learned map A B (all weights)
    baseline: SpatialScale  # the same for the plain autoencoder (m = 0: PCA, same rank)
    data_scale: SpatialScale  # spatial scale of A B on the inputs the data carries (spatial.on_data)
    data_baseline: SpatialScale  # the same for PCA
    off_data_fraction: float  # share of ||A B||^2 on input directions outside that data subspace
    eigengap: float  # (lambda_k - lambda_k+1) / lambda_1; ~0: the rank-k optimum is not unique (nan at k = d)
    data_basis: np.ndarray  # [d, q] the input directions of the data_* measures (spatial.data_basis)
    ridge: float = 0.0

    @property
    def rank(self) -> int:
        return self.features.shape[1]

    @property
    def map(self) -> np.ndarray:
        """The learned rank-k map A B ([d, d]); x_hat = (r * x) A B."""
        return self.encoder @ self.decoder

    @property
    def mean_distance(self) -> float:
        return self.scale.mean_distance

    @property
    def outside_patch_fraction(self) -> float:
        return self.scale.outside_patch_fraction

    @property
    def decay_length(self) -> float:
        return self.scale.decay_length


def _top_eigh(G, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of the symmetric G, largest first, each vector's largest entry positive.

    Lanczos (ARPACK, fixed start vector, so deterministic) when k is small against d, else dense."""
    d = G.shape[0]
    evals = None
    if d >= 128 and k <= d // 8:
        try:
            evals, U = eigsh(G, k=k, which="LA", v0=np.ones(d) / np.sqrt(d), tol=1e-13)
        except ArpackNoConvergence:
            evals = None
    if evals is None:
        evals, U = np.linalg.eigh(G)
        evals, U = evals[d - k:], U[:, d - k:]
    order = np.argsort(evals)[::-1]
    U = U[:, order]  # [d, k]
    sign = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])])  # [k] largest entry positive
    return evals[order].copy(), U * np.where(sign == 0, 1.0, sign)  # [k], [d, k]


def pca(S, rank: int) -> np.ndarray:
    """Top-``rank`` eigenvectors of S ([d, k], largest eigenvalue first)."""
    S = _check_S(S)
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not (1 <= rank <= S.shape[0]):
        raise ValueError(f"rank: expected an int in [1, d={S.shape[0]}], got {rank!r}")
    return _top_eigh(S, rank)[1]  # [d, k]


def linear_mae(S, image_size, patch_size: int, mask_ratio: float, rank: int | None = None,
               ridge: float = DEFAULT_RIDGE, pca_features: np.ndarray | None = None,
               power: float = DEFAULT_POWER, basis: np.ndarray | None = None) -> LinearMAE:
    """Closed-form linear MAE for second moment S ([d, d]); ``rank=None`` means full rank (k = d).

    V is regularised as V + ridge * mean(diag V) * I before it is inverted, so a singular S (fewer
    images than pixels, constant pixels) still has a well-defined answer; the loss is always
    evaluated with the unregularised S. With ridge > 0, m = 0 still gives exactly the PCA subspace.
    ``pca_features`` ([d, k], optional): pca(S, k) if already computed (for the baseline measures).
    ``basis`` ([d, q], optional): data_basis(S, power) if already computed (for the data-weighted measures).
    The eigenproblem is solved in whitened form: V = C C^T (Cholesky), M = C^-1 S, and U_k are the
    top eigenvectors of the symmetric M^T M = S V^-1 S.
    """
    S = _check_S(S)
    d = S.shape[0]
    h, w, _ = check_setup(d, image_size, patch_size, mask_ratio)
    k = d if rank is None else rank
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not (1 <= k <= d):
        raise ValueError(f"rank: expected an int in [1, d={d}] or None, got {rank!r}")
    if not (ridge >= 0 and np.isfinite(ridge)):
        raise ValueError(f"ridge: expected a finite value >= 0, got {ridge!r}")
    m = float(mask_ratio)
    V = masked_second_moment(S, (h, w), patch_size, m)  # [d, d]
    mean_diag = float(np.mean(np.diag(V)))
    if mean_diag <= 0:
        raise ValueError("S: the diagonal is all zero (every image is zero)")
    Vr = V + ridge * mean_diag * np.eye(d)  # [d, d]
    try:
        C = linalg.cholesky(Vr, lower=True)  # [d, d]
    except linalg.LinAlgError:
        raise ValueError(f"V is not positive definite with ridge={ridge}; S is singular: pass a larger ridge "
                         "(e.g. 1e-6) or build S from more images") from None
    M = linalg.solve_triangular(C, S, lower=True)  # [d, d] C^-1 S
    G = M.T @ M  # [d, d] S V^-1 S
    G = (G + G.T) / 2
    evals, U = _top_eigh(G, min(k + 1, d))  # [k+1], [d, k+1] largest first (one more, for the gap)
    gap = float((evals[k - 1] - evals[k]) / evals[0]) if k < d and evals[0] > 0 else math.nan
    evals, U = evals[:k], U[:, :k]
    full_map = linalg.cho_solve((C, True), S)  # [d, d] V^-1 S
    encoder = full_map @ U  # [d, k]
    decoder = U.T  # [k, d]
    loss = expected_loss(S, encoder, decoder, (h, w), patch_size, m)
    Q = data_basis(S, power) if basis is None else np.asarray(basis, dtype=np.float64)  # [d, q]
    if Q.ndim != 2 or Q.shape[0] != d:
        raise ValueError(f"basis: expected shape (d={d}, q), got {Q.shape}")
    W = encoder @ decoder  # [d, d]
    scale, data_scale = spatial_scale(W, (h, w), patch_size), spatial_scale(on_data(W, Q), (h, w), patch_size)
    if m == 0.0:
        base, data_base = scale, data_scale
    else:
        Up = pca(S, k) if pca_features is None else np.asarray(pca_features, dtype=np.float64)  # [d, k]
        if Up.shape != (d, k):
            raise ValueError(f"pca_features: expected shape {(d, k)}, got {Up.shape}")
        Wp = Up @ Up.T  # [d, d]
        base, data_base = spatial_scale(Wp, (h, w), patch_size), spatial_scale(on_data(Wp, Q), (h, w), patch_size)
    return LinearMAE(features=U, eigenvalues=evals, encoder=encoder, decoder=decoder, full_map=full_map,
                     expected_loss=loss, trace=float(np.trace(S)), image_size=(h, w), patch_size=int(patch_size),
                     mask_ratio=m, scale=scale, baseline=base, data_scale=data_scale, data_baseline=data_base,
                     off_data_fraction=off_data_fraction(W, Q), eigengap=gap, data_basis=Q, ridge=float(ridge))


def principal_angles(U1, U2) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spans of U1 and U2."""
    return linalg.subspace_angles(np.asarray(U1, dtype=np.float64), np.asarray(U2, dtype=np.float64))[::-1]


def _noise_variance(S: np.ndarray, noise: float) -> float:
    if not (noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise: expected a finite value >= 0, got {noise!r}")
    return float(noise) * float(np.mean(np.diag(S)))


def denoising_loss(S, A, B, noise: float) -> float:
    """E ||x - (x + e) A B||^2 with e ~ N(0, s^2 I), s^2 = noise * mean(diag S): the linear DAE objective."""
    S = _check_S(S)
    W = np.asarray(A, dtype=np.float64) @ np.asarray(B, dtype=np.float64)  # [d, d]
    s2 = _noise_variance(S, noise)
    return float(np.trace(S) - 2 * np.sum(S * W.T) + np.sum(W * (S @ W)) + s2 * np.sum(W * W))


def linear_dae(S, noise: float, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k optimum of ``denoising_loss``: (encoder A [d, k], decoder B [k, d]).

    The objective has the MAE's form with V = S + s^2 I, so A = V^-1 S U_k and B = U_k^T where U_k are the
    top eigenvectors of S V^-1 S, a monotone function of S: U_k is PCA and A = U_k diag(l / (l + s^2)).
    """
    S = _check_S(S)
    d = S.shape[0]
    k = d if rank is None else rank
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not (1 <= k <= d):
        raise ValueError(f"rank: expected an int in [1, d={d}] or None, got {rank!r}")
    s2 = _noise_variance(S, noise)
    evals, U = _top_eigh(S, k)  # [k], [d, k]
    return U * (evals / (evals + s2)) if s2 > 0 else U.copy(), U.T.copy()
