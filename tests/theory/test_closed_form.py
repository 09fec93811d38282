"""The closed-form linear MAE: Monte Carlo, optimality, limits, SGD, measures, validation."""
import math

import numpy as np
import pytest
import torch

from mae_fast.theory import (blockdiag, expected_loss, image_matrix, linear_mae, masked_second_moment,
                             patch_ids, pca, principal_angles, sample_paths, second_moment, spatial_scale)
from mae_fast.theory.spatial import decay_length

SIZE = 8


@pytest.fixture(scope="module")
def photos():
    """Rows of 8x8 grayscale crops of the bundled photographs and their second moment."""
    pytest.importorskip("skimage", reason="the sample photographs ship with scikit-image")
    X = image_matrix(sample_paths(), SIZE, n_samples=2048, seed=3)  # [2048, 64]
    return X, second_moment(X)


def mc_loss(X, W, patch_size, m, draws, rng):
    """Monte Carlo E_r ||x - (r * x) W||^2 averaged over the rows X, each row with ``draws`` masks."""
    pid = patch_ids((SIZE, SIZE), patch_size, X.shape[1] // (SIZE * SIZE))  # [d]
    n_patches = int(pid.max()) + 1
    total = 0.0
    for _ in range(draws):
        keep = rng.random((X.shape[0], n_patches)) >= m  # [n, P] each patch dropped with prob m
        R = keep[:, pid]  # [n, d]
        total += np.sum((X - (R * X) @ W) ** 2) / X.shape[0]
    return total / draws


@pytest.mark.parametrize("patch_size,m", [(2, 0.75), (4, 0.5), (4, 0.9)])
def test_closed_form_loss_matches_monte_carlo(photos, patch_size, m):
    X, S = photos
    rng = np.random.default_rng(0)
    fit = linear_mae(S, SIZE, patch_size, m, rank=4)
    A_rand = rng.standard_normal((64, 4)) * 0.05
    B_rand = rng.standard_normal((4, 64)) * 0.05
    for A, B in [(fit.encoder, fit.decoder), (A_rand, B_rand), (fit.full_map, np.eye(64))]:
        exact = expected_loss(S, A, B, SIZE, patch_size, m)
        est = mc_loss(X, A @ B, patch_size, m, draws=60, rng=rng)
        assert abs(est - exact) / exact < 0.01, (est, exact)
    # the check has teeth: ignoring the patch structure (V = S, i.e. pixel-wise masks) is off by > 1 %
    W = fit.encoder @ fit.decoder
    V_pixelwise = (1 - m) * S + m * np.diag(np.diag(S))  # [d, d]
    wrong = np.trace(S) - 2 * (1 - m) * np.sum(S * W.T) + (1 - m) * np.sum(W * (V_pixelwise @ W))
    est = mc_loss(X, W, patch_size, m, draws=60, rng=rng)
    assert abs(est - wrong) / est > 0.01


def test_loss_at_optimum_is_trace_minus_eigenvalues(photos):
    _, S = photos
    m = 0.75
    fit = linear_mae(S, SIZE, 4, m, rank=6)
    assert fit.expected_loss == pytest.approx(np.trace(S) - (1 - m) * fit.eigenvalues.sum(), rel=1e-9)
    assert np.allclose(fit.features.T @ fit.features, np.eye(6), atol=1e-10)
    assert np.all(np.diff(fit.eigenvalues) <= 1e-12)  # largest first
    # features are eigenvectors of S V^-1 S
    G = S @ np.linalg.solve(masked_second_moment(S, SIZE, 4, m), S)
    assert np.allclose(G @ fit.features, fit.features * fit.eigenvalues, rtol=1e-6, atol=1e-8 * fit.eigenvalues[0])
    assert fit.encoder.shape == (64, 6) and fit.decoder.shape == (6, 64) and fit.full_map.shape == (64, 64)


@pytest.mark.parametrize("rank", [3, 64])
def test_random_perturbations_never_lower_the_loss(photos, rank):
    _, S = photos
    m, p = 0.75, 2
    fit = linear_mae(S, SIZE, p, m, rank=rank)
    rng = np.random.default_rng(1)
    best = fit.expected_loss
    tol = 1e-10 * np.trace(S)
    for scale in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        for _ in range(10):
            dA = rng.standard_normal(fit.encoder.shape) * scale * np.abs(fit.encoder).max()
            dB = rng.standard_normal(fit.decoder.shape) * scale * np.abs(fit.decoder).max()
            assert expected_loss(S, fit.encoder + dA, fit.decoder + dB, SIZE, p, m) >= best - tol
    # the best map built on the PCA features is strictly worse for m > 0 (the optimum is not PCA)
    if rank < 64:
        U = pca(S, rank)
        assert expected_loss(S, fit.full_map @ U, U.T, SIZE, p, m) > best + 1e-6 * np.trace(S)


def test_mask_ratio_zero_is_pca(photos):
    _, S = photos
    fit = linear_mae(S, SIZE, 2, 0.0, rank=5)
    assert principal_angles(fit.features, pca(S, 5)).max() < 1e-6
    assert fit.mean_distance == pytest.approx(fit.baseline.mean_distance, rel=1e-6)


@pytest.mark.parametrize("m", [0.25, 0.75, 0.9])
def test_one_patch_covering_the_image_is_pca_for_every_ratio(photos, m):
    _, S = photos
    fit = linear_mae(S, SIZE, SIZE, m, rank=5)
    assert principal_angles(fit.features, pca(S, 5)).max() < 1e-6
    # control: small patches at the same ratio move the subspace away from PCA
    assert principal_angles(linear_mae(S, SIZE, 2, m, rank=5).features, pca(S, 5)).max() > 0.05


def _local_vs_global_data(rng, n=8192):
    """8x8 Gaussian data: 4 strong components inside single 4x4 patches, 4 weaker global ones, noise."""
    d = 64
    pid = patch_ids((8, 8), 4)
    comps, var = [], []
    for j in range(4):
        v = np.where(pid == j, rng.standard_normal(d), 0.0)
        comps.append(v / np.linalg.norm(v))
        var.append(1.0)
    for _ in range(4):
        v = rng.standard_normal(d)
        comps.append(v / np.linalg.norm(v))
        var.append(0.6)
    C = np.array(comps).T  # [d, 8]
    return (rng.standard_normal((n, 8)) * np.sqrt(var)) @ C.T + 0.1 * rng.standard_normal((n, d))  # [n, d]


def test_sgd_on_masked_data_converges_to_the_closed_form_subspace():
    rng = np.random.default_rng(0)
    X = _local_vs_global_data(rng)  # [8192, 64]
    S = second_moment(X)
    p, m, k = 4, 0.75, 4
    fit = linear_mae(S, 8, p, m, rank=k)
    gap = principal_angles(fit.features, pca(S, k)).max()
    assert gap > 0.5  # MAE and PCA subspaces are far apart here, so the check below can fail

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend with the BLAS threads numpy left behind
    try:
        A, B = _train_masked_linear_mae(X, p, m, k)
    finally:
        torch.set_num_threads(threads)
    Bn = B.detach().numpy()
    assert principal_angles(Bn.T, fit.features).max() < 0.1
    assert expected_loss(S, A.detach().numpy(), Bn, 8, p, m) < fit.expected_loss * 1.01


def _train_masked_linear_mae(X, p, m, k):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    Xt = torch.from_numpy(X)
    pid = torch.from_numpy(patch_ids((8, 8), p))
    A = (0.1 * torch.randn(64, k, dtype=torch.float64)).requires_grad_()
    B = (0.1 * torch.randn(k, 64, dtype=torch.float64)).requires_grad_()
    steps = 1500
    opt = torch.optim.Adam([A, B], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x = Xt[torch.randint(0, Xt.shape[0], (256,), generator=g)]  # [256, 64]
        keep = (torch.rand(256, 4, generator=g, dtype=torch.float64) >= m).double()  # [256, 4]
        r = keep[:, pid]  # [256, 64]
        loss = ((x - (r * x) @ A @ B) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return A, B


def test_larger_ratio_or_patch_gives_a_longer_spatial_range(photos):
    _, S = photos
    md = {(m, p): linear_mae(S, SIZE, p, m, rank=8).mean_distance for m in (0.0, 0.5, 0.9) for p in (2, 4)}
    assert md[(0.0, 2)] < md[(0.5, 2)] < md[(0.9, 2)]
    assert md[(0.0, 4)] < md[(0.5, 4)] < md[(0.9, 4)]
    assert md[(0.5, 2)] < md[(0.5, 4)] and md[(0.9, 2)] < md[(0.9, 4)]


def test_singular_S_needs_and_gets_the_ridge():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((10, 64))  # 10 images, 64 pixels: S has rank 10
    X[:, 5] = 0.0  # a dead pixel: a zero row and column, so V is singular for every m
    S = second_moment(X)
    with pytest.raises(ValueError, match="ridge"):
        linear_mae(S, SIZE, 2, 0.5, rank=4, ridge=0.0)
    fit = linear_mae(S, SIZE, 2, 0.5, rank=4)
    assert np.isfinite(fit.full_map).all() and np.isfinite(fit.expected_loss)
    assert 0 <= fit.expected_loss <= np.trace(S)
    assert principal_angles(linear_mae(S, SIZE, 2, 0.0, rank=4).features, pca(S, 4)).max() < 1e-6


def test_colour_channels_stay_with_their_pixel():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((600, 4 * 4 * 3))
    X[:, 1::3] += X[:, 0::3]  # correlate channels within a pixel
    S = second_moment(X)
    pid = patch_ids((4, 4), 2, 3)
    assert np.array_equal(pid[:6], [0, 0, 0, 0, 0, 0]) and pid[6] == 1  # (row 0, col 2) starts patch 1
    assert np.array_equal(blockdiag(S, 4, 2) != 0, pid[:, None] == pid[None, :])
    fit = linear_mae(S, (4, 4), 2, 0.75, rank=6)
    assert fit.features.shape == (48, 6)
    assert fit.expected_loss == pytest.approx(np.trace(S) - 0.25 * fit.eigenvalues.sum(), rel=1e-9)


def test_spatial_measures_on_known_maps():
    n = SIZE * SIZE
    s = spatial_scale(np.eye(n), SIZE, 2)
    assert (s.mean_distance, s.outside_patch_fraction) == (0.0, 0.0)
    # every pixel predicted from its right neighbour (last column: from itself)
    W = np.zeros((n, n))
    for j in range(n):
        r, c = divmod(j, SIZE)
        W[r * SIZE + min(c + 1, SIZE - 1), j] = 1.0
    s = spatial_scale(W, SIZE, 2)
    assert s.mean_distance == pytest.approx(7 / 8)
    assert s.outside_patch_fraction == pytest.approx(3 / 8)  # columns 1, 3, 5 cross a patch border
    # exponential kernel: the fitted decay length recovers its length
    rows, cols = np.divmod(np.arange(32 * 32), 32)
    dist = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
    for length in (2.0, 5.0):
        assert decay_length(np.exp(-dist / length), (32, 32)) == pytest.approx(length, rel=0.1)
    assert math.isinf(decay_length(np.ones((64, 64)), (8, 8)))
    # colour: weights are summed over channel pairs
    Wc = np.kron(W, np.ones((3, 3)) / 3)
    assert spatial_scale(Wc, SIZE, 2).mean_distance == pytest.approx(7 / 8)


def test_validation_errors(photos):
    _, S = photos
    with pytest.raises(ValueError, match="patch_size: 3 does not divide"):
        linear_mae(S, SIZE, 3, 0.5)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"mask_ratio: expected a value in \[0, 1\)"):
            linear_mae(S, SIZE, 2, bad)
    with pytest.raises(ValueError, match="rank"):
        linear_mae(S, SIZE, 2, 0.5, rank=65)
    with pytest.raises(ValueError, match="d = h\\*w\\*C"):
        linear_mae(S, (7, 7), 7, 0.5)
    with pytest.raises(ValueError, match="symmetric"):
        linear_mae(S + np.triu(np.ones_like(S), 1), SIZE, 2, 0.5)
    with pytest.raises(ValueError, match="square"):
        linear_mae(S[:10], SIZE, 2, 0.5)
    with pytest.raises(ValueError, match="A, B"):
        expected_loss(S, np.zeros((64, 3)), np.zeros((4, 64)), SIZE, 2, 0.5)
