"""Principal angles, overlaps and the null band."""

import numpy as np
import pytest

from probe.geometry import layer_geometry, null_overlaps, overlap, principal_angles


def test_principal_angles_are_zero_for_identical_and_ninety_for_orthogonal_subspaces():
    basis = np.eye(6)
    assert np.allclose(principal_angles(basis[:, :2], basis[:, :2] @ np.array([[1, 2], [3, -1]])), 0, atol=1e-6)
    assert np.allclose(principal_angles(basis[:, :2], basis[:, 2:4]), 90)
    assert overlap(basis[:, :2], basis[:, :2]) == pytest.approx(1)
    assert overlap(basis[:, :2], basis[:, 2:4]) == pytest.approx(0, abs=1e-12)
    diagonal = (basis[:, 0] + basis[:, 1])[:, None]
    assert principal_angles(basis[:, :1], diagonal)[0] == pytest.approx(45)


def test_null_band_is_right_on_random_data():
    """Random k-dim subspaces against a fixed r-dim one in R^d overlap by k r / d / min(k, r) on average; on
    isotropic activations the covariance null is that same null; an independent random subspace lands in it."""
    rng = np.random.default_rng(0)
    d, k, r = 64, 4, 3
    reference = np.linalg.qr(rng.standard_normal((d, r)))[0]
    uniform = null_overlaps(reference, k, 400, rng)
    assert uniform.mean() == pytest.approx(k * r / d / min(k, r), rel=0.1)
    isotropic = null_overlaps(reference, k, 400, rng, activations=rng.standard_normal((2000, d)))
    assert np.quantile(isotropic, 0.5) == pytest.approx(np.quantile(uniform, 0.5), rel=0.15)
    low, high = np.quantile(uniform, [0.05, 0.95])
    inside = [low <= overlap(rng.standard_normal((d, k)), reference) <= high for _ in range(200)]
    assert 0.8 <= np.mean(inside) <= 0.98


def test_layer_geometry_tells_an_effect_along_knowledge_from_one_across_it():
    rng = np.random.default_rng(0)
    n, d = 200, 48
    base = rng.standard_normal((n, 2, d))
    knowledge = [np.eye(d)[:2], np.eye(d)[:2]]  # the probes read dimensions 0 and 1
    along, across = base.copy(), base.copy()
    along[:, 1, 0] += 2 + 0.1 * rng.standard_normal(n)
    across[:, 1, 10] += 2 + 0.1 * rng.standard_normal(n)
    on = layer_geometry(base, along, knowledge, layers=[0, 1], n_draws=100)
    off = layer_geometry(base, across, knowledge, layers=[0, 1], n_draws=100)
    assert list(on.layer) == [1]  # layer 0 did not change: left out
    assert on.overlap[0] > 0.9 > on.covariance_q95[0]
    assert off.overlap[0] < 0.01 and off.min_angle[0] > 85
