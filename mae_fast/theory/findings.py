"""The paper's findings, reproduced: the optimum (Theorem 1), the Ising border weights, the Jacobian locality.

Each function returns plain rows (dicts) that `mae-fast theory --findings` prints and docs/THEORY.md quotes.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import minimize

from .closed_form import check_setup, expected_loss, linear_dae, linear_mae, patch_ids, principal_angles
from .covariances import ising_covariance
from .spatial import (DEFAULT_POWER, as_pair, data_basis, jacobian_decay, jacobian_profile, on_data,
                      spatial_scale)

MAX_ENUMERATION = 2 ** 28  # masks x d^2: the largest exact enumeration optimum_check builds


def _keep_patterns(n_patches: int, mask_ratio: float):
    """Every keep pattern over the patches ([2^L, L] of 0/1) and its probability ([2^L])."""
    keep = np.array(list(itertools.product((0.0, 1.0), repeat=n_patches)))  # [2^L, L]
    prob = np.prod(np.where(keep == 1.0, 1.0 - mask_ratio, mask_ratio), axis=1)  # [2^L]
    return keep, prob


def enumerated_loss(X, W, image_size, patch_size: int, mask_ratio: float) -> float:
    """E_r ||x - (r * x) W||^2 averaged over the rows of X ([n, d]), summed exactly over all 2^L masks."""
    X = np.asarray(X, dtype=np.float64)
    h, w, c = check_setup(X.shape[1], image_size, patch_size, mask_ratio)
    pid = patch_ids((h, w), patch_size, c)  # [d]
    keep, prob = _keep_patterns(int(pid.max()) + 1, float(mask_ratio))
    total = 0.0
    for r, pr in zip(keep[:, pid], prob):  # r: [d] keep flag of every entry
        total += pr * np.sum((X - (X * r) @ W) ** 2)
    return float(total / X.shape[0])


def paper_form_loss(X, W, image_size, patch_size: int, mask_ratio: float) -> float:
    """The paper's form ||X - (1 - m) X W||^2 + m (1 - m) ||G W||^2, per row of X ([n, d]).

    G stacks one copy of X per patch with every column outside that patch set to zero, so that
    G^T G = blkdiag_p(X^T X)."""
    X = np.asarray(X, dtype=np.float64)
    h, w, c = check_setup(X.shape[1], image_size, patch_size, mask_ratio)
    m = float(mask_ratio)
    pid = patch_ids((h, w), patch_size, c)  # [d]
    G = np.concatenate([X * (pid == j) for j in range(int(pid.max()) + 1)])  # [n L, d]
    return float((np.sum((X - (1 - m) * X @ W) ** 2) + m * (1 - m) * np.sum((G @ W) ** 2)) / X.shape[0])


def optimum_check(X, image_size, patch_size: int, mask_ratio: float, rank: int, starts: int = 3,
                  seed: int = 0) -> dict:
    """Theorem 1 by brute force: L-BFGS on (A, B) of the exactly enumerated expected loss, from random starts.

    The loss is summed over all 2^L masks (each mask's quadratic form accumulated literally), minimised
    from ``starts`` random (A, B) and compared with the closed form: ``rel_gap`` is the largest
    (found - closed form) / closed form over the starts, ``max_angle`` the largest principal angle (rad)
    between a found decoder's row space and the closed-form features. ``paper_form_rel_diff`` and
    ``closed_form_rel_diff`` compare the paper's form and ``expected_loss`` with the enumeration at the
    found optimum."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    h, w, c = check_setup(d, image_size, patch_size, mask_ratio)
    m = float(mask_ratio)
    pid = patch_ids((h, w), patch_size, c)  # [d]
    L = int(pid.max()) + 1
    if 2 ** L * d * d > MAX_ENUMERATION:
        raise ValueError(f"{2 ** L} masks x d^2 = {d}^2 is too large to enumerate (at most {MAX_ENUMERATION})")
    S = X.T @ X / n  # [d, d]
    fit = linear_mae(S, (h, w), patch_size, m, rank=rank)
    keep, prob = _keep_patterns(L, m)
    M1 = np.zeros((d, d))  # sum_r P(r) diag(r) S      (the linear term's matrix)
    M2 = np.zeros((d, d))  # sum_r P(r) diag(r) S diag(r)  (the quadratic term's matrix)
    for r, pr in zip(keep[:, pid], prob):
        M1 += pr * r[:, None] * S
        M2 += pr * r[:, None] * S * r[None, :]
    tr = float(np.trace(S))

    def loss_and_grad(z):
        A, B = z[:d * rank].reshape(d, rank), z[d * rank:].reshape(rank, d)
        W = A @ B
        gW = 2 * (M2 @ W - M1)  # d/dW of tr S - 2 tr(M1^T W) + tr(W^T M2 W)
        return tr - 2 * np.sum(M1 * W) + np.sum(W * (M2 @ W)), np.concatenate([(gW @ B.T).ravel(), (A.T @ gW).ravel()])

    rng = np.random.default_rng(seed)
    gaps, angles, iters, best = [], [], [], None
    for _ in range(starts):
        z0 = 0.1 * rng.standard_normal(2 * d * rank)
        res = minimize(loss_and_grad, z0, jac=True, method="L-BFGS-B",
                       options=dict(maxiter=20000, maxfun=40000, gtol=1e-14, ftol=1e-16, maxcor=30))
        A, B = res.x[:d * rank].reshape(d, rank), res.x[d * rank:].reshape(rank, d)
        found = enumerated_loss(X, A @ B, (h, w), patch_size, m)
        gaps.append((found - fit.expected_loss) / fit.expected_loss)
        angles.append(float(principal_angles(B.T, fit.features).max()))
        iters.append(int(res.nit))
        if best is None or found < best[0]:
            best = (found, A, B)
    found, A, B = best
    return {"image_size": [h, w], "patch_size": int(patch_size), "mask_ratio": m, "rank": int(rank),
            "masks": 2 ** L, "starts": int(starts), "closed_form_loss": fit.expected_loss, "found_loss": found,
            "rel_gap": float(max(gaps)), "max_angle": float(max(angles)), "iterations": iters,
            "eigengap": fit.eigengap,
            "paper_form_rel_diff": abs(paper_form_loss(X, A @ B, (h, w), patch_size, m) - found) / found,
            "closed_form_rel_diff": abs(expected_loss(S, A, B, (h, w), patch_size, m) - found) / found}


def border_ratio(W, image_size, patch_size: int) -> float:
    """How much more the map W ([d, d], grayscale) uses patch-border input pixels than interior ones.

    Mean over border pixels of an input pixel's energy sum_j W_ij^2 (its squared encoder row, whatever the
    factorisation A B with orthonormal B), over the same mean for interior pixels; needs patch_size >= 3."""
    h, w = as_pair(image_size)
    if patch_size < 3:
        raise ValueError(f"patch_size: a patch of {patch_size} px has no interior pixels (need >= 3)")
    W = np.asarray(W, dtype=np.float64)
    if W.shape != (h * w, h * w):
        raise ValueError(f"W: expected a grayscale [{h * w}, {h * w}] map, got {W.shape}")
    rows, cols = np.divmod(np.arange(h * w), w)
    r, c = rows % patch_size, cols % patch_size
    border = (r == 0) | (r == patch_size - 1) | (c == 0) | (c == patch_size - 1)  # [n]
    energy = np.sum(W * W, axis=1)  # [n]
    return float(energy[border].mean() / energy[~border].mean())


def ising_findings(image_size=16, patch_size: int = 4, rank: int = 15, couplings=(0.3, 0.6),
                   mask_ratios=(0.0, 0.25, 0.5, 0.75, 0.9)) -> list[dict]:
    """border_ratio of the linear MAE on the Ising-like covariance for each (coupling, mask ratio).

    Rank 15 because tanh(J)^(|dr| + |dc|) is symmetric under transposing the image, which makes many
    eigenvalues come in equal pairs: rank 16 on 16 x 16 with 4 px patches splits such a pair, and the
    rank-16 optimum is then not unique (``eigengap`` in each row says so)."""
    out = []
    for J in couplings:
        S = ising_covariance(image_size, J)
        for m in mask_ratios:
            fit = linear_mae(S, image_size, patch_size, m, rank=rank)
            out.append({"coupling": float(J), "mask_ratio": float(m), "patch_size": int(patch_size),
                        "rank": int(rank), "border_ratio": border_ratio(fit.map, image_size, patch_size),
                        "eigengap": fit.eigengap})
    return out


def _finite(x):
    return x if math.isfinite(x) else None


def _jacobian_row(model, W, Q, image_size, patch_size, mask_ratio, keep_profile):
    row = {"model": model, "mask_ratio": mask_ratio, "patch_size": patch_size,
           "jacobian_decay": _finite(jacobian_decay(W, image_size)),
           "data_jacobian_decay": _finite(jacobian_decay(on_data(W, Q), image_size)),
           "mean_distance": spatial_scale(W, image_size, patch_size or 1).mean_distance,
           "data_mean_distance": spatial_scale(on_data(W, Q), image_size, patch_size or 1).mean_distance}
    if keep_profile:
        r, mean, _ = jacobian_profile(on_data(W, Q), image_size)
        row["data_profile"] = [r.tolist(), mean.tolist()]
    return row


def jacobian_findings(S, image_size, rank: int | None, mask_ratios=(0.25, 0.5, 0.75, 0.9), patch_sizes=(2, 4, 8),
                      noise: float = 0.5, power: float = DEFAULT_POWER, keep_profiles: bool = False) -> list[dict]:
    """Locality of the plain AE (PCA), the denoising AE (``linear_dae``, ``noise``) and the MAE, same rank.

    Per model: ``jacobian_decay`` (mean |W_ij| against distance, exponential fit; None: no decay within
    the image) and ``mean_distance`` (W_ij^2-weighted), each also on the data (``data_*``: the map on the
    input directions holding ``power`` of tr S). AE and DAE rows have mask_ratio 0 and patch_size None."""
    S = np.asarray(S, dtype=np.float64)
    Q = data_basis(S, power)
    A, B = linear_dae(S, 0.0, rank)  # PCA: A = U_k, B = U_k^T
    rows = [_jacobian_row("AE", A @ B, Q, image_size, None, 0.0, keep_profiles)]
    A, B = linear_dae(S, noise, rank)
    rows.append(dict(_jacobian_row("DAE", A @ B, Q, image_size, None, 0.0, keep_profiles), noise=float(noise)))
    for p in patch_sizes:
        for m in mask_ratios:
            fit = linear_mae(S, image_size, p, m, rank=rank, basis=Q, pca_features=A)
            rows.append(_jacobian_row("MAE", fit.map, Q, image_size, int(p), float(m), keep_profiles))
    return rows


def jacobian_claims(rows, key: str = "data_jacobian_decay") -> dict:
    """Which parts of "AE <= DAE < MAE, growing with m and with p" hold for ``key`` in jacobian_findings rows.

    A missing value (None: no decay within the image) counts as longer than any number."""
    def v(x):
        return math.inf if x[key] is None else x[key]

    ae = v(next(r for r in rows if r["model"] == "AE"))
    dae = v(next(r for r in rows if r["model"] == "DAE"))
    mae = {(r["patch_size"], r["mask_ratio"]): v(r) for r in rows if r["model"] == "MAE"}
    ps = sorted({p for p, _ in mae})
    ms = sorted({m for _, m in mae})
    def grows(a, b):
        return a < b or a == b == math.inf

    return {"ae_le_dae": ae <= dae, "dae_lt_mae": all(x > dae for x in mae.values()),
            "ae_lt_mae": all(x > ae for x in mae.values()),
            "grows_with_m": all(grows(mae[(p, a)], mae[(p, b)]) for p in ps for a, b in zip(ms, ms[1:])),
            "grows_with_p": all(grows(mae[(a, m)], mae[(b, m)]) for m in ms for a, b in zip(ps, ps[1:]))}
