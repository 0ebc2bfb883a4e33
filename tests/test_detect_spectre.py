"""SPECTRE: robust estimation, QUE with the matrix exponential, and the detector end to end."""

from __future__ import annotations

import numpy as np
import pytest
from poisonguard import Spectre
from poisonguard.detect.spectre import que_scores, robust_mean_cov


def _que_reference(z, alpha):
    # Independent route: the exponential of a symmetric matrix through its eigendecomposition.
    n, k = z.shape
    m = z.T @ z / n - np.eye(k)
    w, v = np.linalg.eigh(m)
    norm = np.abs(w).max()
    q = (v * np.exp(alpha * w / norm)) @ v.T
    q /= np.trace(q)
    return np.einsum("ij,jk,ik->i", z, q, z)


def test_que_uses_the_matrix_exponential(rng):
    z = rng.standard_normal((400, 6)) * np.array([3.0, 1, 1, 1, 1, 0.5])
    z[:, :2] = z[:, :2] @ np.array([[1.0, 0.6], [0.6, 1.0]])  # off-diagonal structure
    got = que_scores(z, 4.0)
    np.testing.assert_allclose(got, _que_reference(z, 4.0), rtol=1e-9)
    m = z.T @ z / len(z) - np.eye(6)
    elementwise = np.exp(4.0 * m / np.linalg.norm(m, 2))
    elementwise /= np.trace(elementwise)
    wrong = np.einsum("ij,jk,ik->i", z, elementwise, z)
    assert not np.allclose(got, wrong, rtol=1e-3)


def test_que_of_isotropic_data_is_the_mean_square(rng):
    z = np.eye(5) * np.sqrt(5)  # S = I exactly
    np.testing.assert_allclose(que_scores(z, 4.0), (z**2).sum(axis=1) / 5)


def test_robust_mean_cov_ignores_outliers(rng):
    inliers = rng.standard_normal((900, 3))
    outliers = rng.standard_normal((100, 3)) * 0.1 + 8.0
    p = np.vstack([inliers, outliers])
    mu, cov, kept = robust_mean_cov(p, trim=0.2)
    assert np.abs(mu).max() < 0.15
    assert np.abs(np.diag(cov) - 0.75).max() < 0.3  # trimmed: a bit below 1
    assert not kept[900:].any()


def _poisoned(rng, n=8000, d=32, g=4, n_poison=150, shift=1.5):
    y = rng.integers(0, g, n)
    x = rng.standard_normal((n, d)) + 3 * rng.standard_normal((g, d))[y]
    poison = np.sort(rng.choice(np.flatnonzero(y == 2), n_poison, replace=False))
    x[poison] += shift * rng.standard_normal(d)
    return x.astype(np.float32), y, poison


def test_auto_finds_poison_with_few_false_positives(rng):
    x, y, poison = _poisoned(rng)
    det = Spectre("auto", n_components=16).fit(x, y)
    assert det.is_poison_[poison].mean() >= 0.95
    clean = np.ones(len(x), dtype=bool)
    clean[poison] = False
    assert det.is_poison_[clean].mean() <= 0.01


def test_paper_rule_counts_and_report(rng):
    x, y, _ = _poisoned(rng, n=3000)
    det = Spectre(0.05, n_components=8).fit(x, y)
    for c in range(4):
        assert det.is_poison_[y == c].sum() == int(np.floor(1.5 * 0.05 * (y == c).sum() + 1e-9))
    rep = det.report()
    assert rep["method"] == "spectre" and rep["classes"][0]["n_components"] == 8
    assert rep["n_flagged"] == det.is_poison_.sum()


def test_tiny_classes_and_bad_input(rng):
    x, y, _ = _poisoned(rng, n=600, n_poison=5)
    x = np.vstack([x, np.ones((2, x.shape[1]), np.float32)])
    y = np.concatenate([y, [4, 4]])  # class 4: two samples, one PCA dimension: too small to score
    det = Spectre("auto", n_components=4).fit(x, y)
    assert det.report()["skipped_classes"] == [4] and not det.is_poison_[-2:].any()
    with pytest.raises(ValueError, match="alpha"):
        Spectre(alpha=0)
    with pytest.raises(ValueError, match="expected_poison_fraction"):
        Spectre(0)
    with pytest.raises(RuntimeError, match="fit"):
        Spectre().report()
    with pytest.raises(ValueError, match="rows"):
        Spectre().fit(x, y[:10])
