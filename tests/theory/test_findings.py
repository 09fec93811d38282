"""The paper's findings: Theorem 1 by brute force, the Ising border weights, the Jacobian locality;
the fields they run on, the linear DAE, and the data-weighted, saturating scale measures."""
import itertools
import math

import numpy as np
import pytest

from mae_fast.theory import (data_basis, denoising_loss, enumerated_loss, expected_loss, image_matrix,
                             images_second_moment, ising_covariance, ising_findings, jacobian_claims, jacobian_decay,
                             jacobian_findings, linear_dae, linear_mae, off_data_fraction, on_data, optimum_check,
                             paper_form_loss, patch_ids, pca, power_law_covariance, principal_angles, sample_paths,
                             spatial_scale)
from mae_fast.theory.spatial import decay_length, format_distance, format_length, uniform_mean_distance


@pytest.fixture(scope="module")
def crops8():
    pytest.importorskip("skimage", reason="the sample photographs ship with scikit-image")
    return image_matrix(sample_paths(), 8, n_samples=2048, seed=3)  # [2048, 64]


@pytest.fixture(scope="module")
def photos32():
    pytest.importorskip("skimage", reason="the sample photographs ship with scikit-image")
    return images_second_moment(None, 32)  # centred, 4096 crops


# --- Theorem 1 -----------------------------------------------------------------------------------------------

def test_paper_form_enumeration_and_closed_form_are_one_loss(crops8):
    X = crops8
    S = X.T @ X / X.shape[0]
    rng = np.random.default_rng(0)
    for p, m in [(4, 0.75), (4, 0.3), (8, 0.5)]:
        A, B = rng.standard_normal((64, 5)) * 0.1, rng.standard_normal((5, 64)) * 0.1
        enum = enumerated_loss(X, A @ B, 8, p, m)
        assert paper_form_loss(X, A @ B, 8, p, m) == pytest.approx(enum, rel=1e-12)
        assert expected_loss(S, A, B, 8, p, m) == pytest.approx(enum, rel=1e-12)
    # the enumeration by hand for one row and 2 x 2 patches of 4 px: 16 masks, each weighted m^dropped (1-m)^kept
    x = X[:1]
    W = rng.standard_normal((64, 64)) * 0.05
    pid = patch_ids(8, 4)
    total = sum(np.prod([0.6 if k else 0.4 for k in keep]) * np.sum((x - (x * np.array(keep)[pid]) @ W) ** 2)
                for keep in itertools.product((0, 1), repeat=4))
    assert enumerated_loss(x, W, 8, 4, 0.4) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("m", [0.25, 0.75])
def test_theorem1_random_starts_reach_the_closed_form(crops8, m):
    res = optimum_check(crops8, 8, 4, m, rank=4, starts=3, seed=0)
    assert res["masks"] == 16 and res["eigengap"] > 1e-4  # the rank-4 subspace is unique, so angles mean something
    assert -1e-12 <= res["rel_gap"] <= 1e-9  # never below the closed form, and reaches it
    assert res["max_angle"] < 1e-3
    assert res["paper_form_rel_diff"] < 1e-12 and res["closed_form_rel_diff"] < 1e-12
    # the 1e-9 has teeth: the PCA subspace (the m = 0 answer) with its best encoder is far worse here
    S = crops8.T @ crops8 / crops8.shape[0]
    U = pca(S, 4)
    A = np.linalg.solve((1 - m) * S + m * np.where(patch_ids(8, 4)[:, None] == patch_ids(8, 4)[None, :], S, 0), S) @ U
    assert (enumerated_loss(crops8, A @ U.T, 8, 4, m) - res["closed_form_loss"]) / res["closed_form_loss"] > 1e-4


# --- the Ising-like field ------------------------------------------------------------------------------------

def test_ising_covariance_is_the_city_block_power():
    S = ising_covariance(16, 0.3)
    t = np.tanh(0.3)
    assert S[0, 0] == 1.0 and S[0, 1] == pytest.approx(t) and S[0, 16 + 1] == pytest.approx(t ** 2)
    assert S[0, 255] == pytest.approx(t ** 30)
    assert np.linalg.eigvalsh(S).min() > 0
    with pytest.raises(ValueError, match="coupling"):
        ising_covariance(16, 0.0)


def test_ising_border_weight_is_below_one_for_pca_and_grows_with_m():
    rows = ising_findings(16, 4, rank=15, couplings=(0.3, 0.6), mask_ratios=(0.0, 0.25, 0.5, 0.75, 0.9))
    for J in (0.3, 0.6):
        ratio = [r["border_ratio"] for r in rows if r["coupling"] == J]
        assert ratio[0] < 1.0 < ratio[1]
        assert all(a < b for a, b in zip(ratio, ratio[1:]))
    assert min(r["eigengap"] for r in rows) > 1e-3  # every rank-15 optimum is unique
    # why rank 15: at rank 16 a pair of equal eigenvalues is split, so that optimum is not unique
    assert linear_mae(ising_covariance(16, 0.3), 16, 4, 0.0, rank=16).eigengap < 1e-10


# --- the Jacobian locality -----------------------------------------------------------------------------------

def test_jacobian_locality_on_photographs(photos32):
    rows = jacobian_findings(photos32, 32, 32, mask_ratios=(0.25, 0.75), patch_sizes=(2, 4, 8), noise=0.5)
    for key in ("data_jacobian_decay", "data_mean_distance"):
        c = jacobian_claims(rows, key)
        assert c["dae_lt_mae"] and c["ae_lt_mae"] and c["grows_with_m"] and c["grows_with_p"], (key, c)
        # AE <= DAE does not hold: the DAE keeps the PCA subspace and is slightly *more* local (within 5 %)
        ae, dae = (next(r[key] for r in rows if r["model"] == mdl) for mdl in ("AE", "DAE"))
        assert 0.95 * ae < dae < ae
    mae = {(r["patch_size"], r["mask_ratio"]): r for r in rows if r["model"] == "MAE"}
    assert mae[(8, 0.75)]["data_jacobian_decay"] is None  # beyond the image: reported as such, not as a number


def test_jacobian_locality_on_a_power_law_field():
    rows = jacobian_findings(power_law_covariance(32), 32, 32, mask_ratios=(0.25, 0.75), patch_sizes=(2, 4, 8))
    md = jacobian_claims(rows, "data_mean_distance")
    assert md["dae_lt_mae"] and md["grows_with_p"] and not md["grows_with_m"]  # p = 4 falls from m 0.25 to 0.75
    jd = jacobian_claims(rows, "data_jacobian_decay")
    assert not (jd["ae_lt_mae"] or jd["grows_with_m"])  # the exponential fit says the MAE is *more* local here


def test_power_law_covariance_against_an_explicit_sum():
    n, N = 6, 16
    S = power_law_covariance(n, exponent=2.0, period=N)
    f = np.fft.fftfreq(N)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    power = 1.0 / (fx ** 2 + fy ** 2 + (1.0 / N) ** 2)

    def cov(dr, dc):
        return np.sum(power * np.cos(2 * np.pi * (fy * dr + fx * dc))) / np.sum(power)

    for i, j in [(0, 1), (0, n), (0, n + 1), (3, 5 * n + 2), (7, 2 * n + 4)]:
        (ri, ci), (rj, cj) = divmod(i, n), divmod(j, n)
        assert S[i, j] == pytest.approx(cov(ri - rj, ci - cj), rel=1e-10)
    assert np.allclose(np.diag(S), 1.0) and np.linalg.eigvalsh(S).min() > 0
    with pytest.raises(ValueError, match="period"):
        power_law_covariance(8, period=10)


# --- the linear DAE ------------------------------------------------------------------------------------------

def test_linear_dae_is_the_optimum_and_matches_monte_carlo(crops8):
    X = crops8
    S = X.T @ X / X.shape[0]
    A, B = linear_dae(S, 0.5, rank=6)
    assert principal_angles(B.T, pca(S, 6)).max() < 1e-8  # the PCA subspace, shrunk
    best = denoising_loss(S, A, B, 0.5)
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(10):
            dA, dB = (rng.standard_normal(M.shape) * scale * np.abs(M).max() for M in (A, B))
            assert denoising_loss(S, A + dA, B + dB, 0.5) >= best - 1e-12 * np.trace(S)
    s = np.sqrt(0.5 * np.mean(np.diag(S)))
    W = A @ B
    mc = np.mean([np.sum((X - (X + s * rng.standard_normal(X.shape)) @ W) ** 2) / X.shape[0] for _ in range(30)])
    assert mc == pytest.approx(best, rel=0.01)
    assert abs(denoising_loss(S, A, B, 0.0) - best) > 0.05 * best  # without the noise term: far outside that 1 %
    A0, B0 = linear_dae(S, 0.0, 6)
    assert denoising_loss(S, A0, B0, 0.0) == pytest.approx(expected_loss(S, A0, B0, 8, 2, 0.0), rel=1e-12)


# --- data weighting and saturation ---------------------------------------------------------------------------

def test_data_weighting_ignores_weight_on_directions_without_power(crops8):
    S = np.cov(crops8.T, bias=True)
    Q = data_basis(S, 0.99)
    evals = np.sort(np.linalg.eigvalsh(S))[::-1]
    q = Q.shape[1]
    assert evals[:q].sum() >= 0.99 * evals.sum() > evals[:q - 1].sum()
    W0 = linear_mae(S, 8, 2, 0.5, rank=8).map
    u = np.linalg.eigh(S)[1][:, 0]  # the weakest direction
    far = np.zeros(64)
    far[63] = 1.0
    W1 = W0 + 50.0 * np.outer(u, far)  # a large weight on an input direction the images do not carry
    assert np.allclose(on_data(W1, Q), on_data(W0, Q), atol=1e-12)
    s1, s0 = spatial_scale(on_data(W1, Q), 8, 2), spatial_scale(on_data(W0, Q), 8, 2)
    assert s1.mean_distance == pytest.approx(s0.mean_distance, rel=1e-12)
    assert s1.outside_patch_fraction == pytest.approx(s0.outside_patch_fraction, rel=1e-12)
    assert spatial_scale(W1, 8, 2).mean_distance > spatial_scale(W0, 8, 2).mean_distance + 1.0
    assert off_data_fraction(W1, Q) > 0.9
    x = crops8[:5] @ Q @ Q.T  # inputs in the data subspace: on_data acts as W does
    assert np.allclose(x @ on_data(W0, Q), x @ W0)


def test_saturated_measures_are_labelled():
    n = 32 * 32
    s = spatial_scale(np.ones((n, n)), 32, 4)
    assert s.mean_distance == pytest.approx(uniform_mean_distance(32, 32)) and 16.6 < s.mean_distance < 16.8
    assert s.saturated and format_distance(s) == "uniform" and format_length(s.decay_length) == "> image"
    rows, cols = np.divmod(np.arange(n), 32)
    dist = np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :])
    assert math.isinf(decay_length(np.exp(-dist / 200.0), 32))  # longer than the image: not a number
    assert decay_length(np.exp(-dist / 3.0), 32) == pytest.approx(3.0, rel=0.1)
    local = spatial_scale(np.exp(-dist / 3.0), 32, 4)
    assert not local.saturated and format_distance(local) == f"{local.mean_distance:.2f}"
    assert jacobian_decay(np.eye(n), 32) == 0.0  # the identity: all weight at distance 0
    assert jacobian_decay(np.exp(-dist / 3.0), 32) == pytest.approx(3.0, rel=0.1)
