"""Streamed class-segmented subspace iteration: the segmented power-pass kernel against the float64 reference, and
the subspace route of the detectors against the exact covariance route."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_input, to_float64
from poisonguard import SpectralSignature, Spectre, scan
from poisonguard._reference import _segmented_power_pass
from poisonguard.detect._twopass import covariance_bytes, project_by_class
from poisonguard.ops import segmented_power_pass

TOL = {"float64": 1e-12, "float32": 3e-6, "float16": 3e-6, "bfloat16": 3e-6}


def _run(x, groups, shift, q, splits=(0.5,)):
    g, d, l = q.shape
    z, sums, counts = np.zeros((g, d, l)), np.zeros((g, d)), np.zeros(g, dtype=np.int64)
    n = x.shape[0]
    cuts = [0, *[int(n * f) for f in splits], n]
    for a, b in zip(cuts[:-1], cuts[1:]):
        segmented_power_pass(x[a:b], None if groups is None else groups[a:b], shift, q, z, sums, counts)
    return z, sums, counts


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("n", "d", "g", "l"), [(1, 1, 1, 1), (9, 4, 3, 2), (700, 33, 5, 4), (3000, 130, 2, 11)])
def test_kernel_matches_reference(rng, dtype, n, d, g, l):
    lib = "torch" if dtype == "bfloat16" else "numpy"
    xi = make_input(rng.standard_normal((n, d)) * 3 + 50, lib, dtype)
    groups = rng.integers(0, g, n)
    shift = rng.standard_normal((g, d)) + 50
    ct = np.float64 if dtype == "float64" else np.float32
    q = np.ascontiguousarray(rng.standard_normal((g, d, l)).astype(ct))
    z, sums, counts = _run(xi, groups, shift, q, splits=(0.3, 0.31))
    zr, sr, cr = _segmented_power_pass(to_float64(xi), groups, shift, q)
    np.testing.assert_array_equal(counts, cr)
    np.testing.assert_allclose(sums, sr, rtol=1e-12, atol=1e-9 * max(1, n))
    scale = max(1.0, float(np.abs(zr).max()))
    np.testing.assert_allclose(z, zr, rtol=0, atol=TOL[dtype] * scale * 8)


def test_kernel_strided_and_no_groups(rng):
    base = rng.standard_normal((90, 40))
    x = base[::3, ::2]  # non-contiguous rows and columns
    shift = rng.standard_normal((1, 20))
    q = rng.standard_normal((1, 20, 3))
    z, sums, counts = _run(x, None, shift, q)
    zr, sr, _ = _segmented_power_pass(x, None, shift, q)
    np.testing.assert_allclose(z, zr, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(sums, sr, atol=1e-12)
    assert counts[0] == 30
    xt = rng.standard_normal((20, 30)).T  # a transposed view
    z, _, _ = _run(xt, None, shift, q)
    np.testing.assert_allclose(z, _segmented_power_pass(xt, None, shift, q)[0], rtol=1e-12, atol=1e-10)


def test_kernel_empty_and_absent_classes(rng):
    q = rng.standard_normal((4, 5, 2))
    shift = np.zeros((4, 5))
    z, sums, counts = _run(np.zeros((0, 5)), np.zeros(0, dtype=np.int64), shift, q)
    assert not z.any() and not sums.any() and not counts.any()
    x = rng.standard_normal((30, 5))
    groups = np.full(30, 2)
    z, _, counts = _run(x, groups, shift, q)
    assert counts.tolist() == [0, 0, 30, 0]
    assert not z[[0, 1, 3]].any() and z[2].any()


def test_kernel_bad_input(rng):
    x = rng.standard_normal((10, 4))
    shift = np.zeros((2, 4))
    q = np.zeros((2, 4, 3))
    z, sums, counts = np.zeros((2, 4, 3)), np.zeros((2, 4)), np.zeros(2, dtype=np.int64)
    with pytest.raises(TypeError, match="q must be float32"):
        segmented_power_pass(x.astype(np.float32), np.zeros(10, dtype=np.int64), shift, q, z, sums, counts)
    with pytest.raises(ValueError, match="q must be"):
        segmented_power_pass(x, np.zeros(10, dtype=np.int64), shift, q[:, :3], z, sums, counts)
    with pytest.raises(ValueError, match="shift must be"):
        segmented_power_pass(x, np.zeros(10, dtype=np.int64), shift[:, :3], q, z, sums, counts)
    with pytest.raises(ValueError, match="groups is required"):
        segmented_power_pass(x, None, shift, q, z, sums, counts)
    with pytest.raises(ValueError):
        segmented_power_pass(x, np.full(10, 5), shift, q, z, sums, counts)
    with pytest.raises(ValueError, match="z has shape"):
        segmented_power_pass(x, np.zeros(10, dtype=np.int64), shift, q, np.zeros((2, 4, 2)), sums, counts)
    with pytest.raises(TypeError, match="wrong dtype"):
        segmented_power_pass(x, np.zeros(10, dtype=np.int64), shift, q, z, sums, counts.astype(np.int32))


def _lowrank(rng, n, d, g, rank=6, offset=20.0, dtype=np.float32):
    """Classes with a decaying low-rank spectrum plus small noise, a large common offset, and a planted shift of 10%
    of class 1 (the poison)."""
    y = rng.integers(0, g, n)
    scales = 3.0 * 0.6 ** np.arange(rank)
    basis = np.linalg.qr(rng.standard_normal((g, d, rank)))[0]
    x = np.einsum("nr,ndr->nd", rng.standard_normal((n, rank)) * scales, basis[y]) + offset
    x += 0.05 * rng.standard_normal((n, d))
    poison = (y == 1) & (rng.random(n) < 0.1)
    x[poison] += 4.0 * rng.standard_normal(d) / np.sqrt(d) * 3
    return x.astype(dtype), y, poison


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_subspace_route_matches_covariance_route(rng, dtype, k):
    x, y, _ = _lowrank(rng, 6000, 60, 4, dtype=dtype)
    exact = project_by_class(x, y, None, k, 1000, solver="covariance")
    sub = project_by_class(x, y, None, k, 1000, solver="subspace")
    assert exact.solver_info()["solver"] == "covariance" and exact.passes == 2
    info = sub.solver_info()
    assert info["solver"] == "subspace" and 3 <= info["passes"] <= 7
    assert info["residual"] < 1e-2
    np.testing.assert_allclose(sub.means, exact.means, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sub.eigenvalues, exact.eigenvalues, rtol=1e-4)
    for c in range(4):  # the same directions up to sign
        overlap = np.abs(np.sum(sub.directions[c] * exact.directions[c], axis=0))
        np.testing.assert_allclose(overlap, 1.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(sub.columns(k)), np.abs(exact.columns(k)), rtol=1e-3, atol=1e-3)


def test_auto_picks_subspace_from_the_budget(rng):
    x, y, poison = _lowrank(rng, 4000, 40, 3)
    need = covariance_bytes(3, 40)
    assert project_by_class(x, y, None, 1, 1000, memory_budget=need).solver == "covariance"
    assert project_by_class(x, y, None, 1, 1000, memory_budget=need - 1).solver == "subspace"
    det = SpectralSignature(0.1, memory_budget=need - 1).fit(x, y)
    rep = det.report()
    assert rep["solver"]["solver"] == "subspace" and rep["solver"]["passes"] >= 3
    exact = SpectralSignature(0.1, solver="covariance").fit(x, y)
    assert exact.report()["solver"] == {"solver": "covariance", "passes": 2, "residual": 0.0}
    np.testing.assert_array_equal(det.is_poison_, exact.is_poison_)
    assert det.is_poison_[poison].mean() > 0.9  # the planted shift is found on both routes


def test_subspace_spectre_and_scan(rng):
    x, y, poison = _lowrank(rng, 6000, 50, 3)
    s = Spectre(0.1, n_components=4, solver="subspace").fit(x, y)
    e = Spectre(0.1, n_components=4, solver="covariance").fit(x, y)
    assert s.report()["solver"]["solver"] == "subspace"
    assert (s.is_poison_ == e.is_poison_).mean() > 0.99
    res = scan(x, y, methods=("spectral", "spectre"), expected_poison_fraction=0.1, solver="subspace")
    assert res.meta["solver"]["solver"] == "subspace"
    assert res.flags["spectral"][poison].mean() > 0.9


def test_subspace_degenerate_classes(rng):
    x = rng.standard_normal((50, 8)).astype(np.float32)
    y = np.zeros(50, dtype=np.int64)
    y[:1] = 1  # a class of one sample
    y[1:3] = 3  # two samples; class 2 is empty
    pr = project_by_class(x, y, None, 2, 16, solver="subspace")
    assert pr.counts.tolist() == [47, 1, 0, 2]
    assert pr.n_components.tolist() == [2, 0, 0, 1]
    assert np.isnan(pr.means[2]).all()
    assert not pr.directions[1].any() and not pr.directions[2].any()
    exact = project_by_class(x, y, None, 2, 16, solver="covariance")
    np.testing.assert_allclose(pr.eigenvalues, exact.eigenvalues, rtol=1e-3, atol=1e-6)
    empty = project_by_class(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 2, 1, 16, solver="subspace")
    assert empty.counts.tolist() == [0, 0] and empty.proj.shape == (0, 1)


def test_bad_solver_arguments(rng):
    x, y, _ = _lowrank(rng, 100, 10, 2)
    with pytest.raises(ValueError, match="solver must be one of"):
        SpectralSignature(0.1, solver="svd")
    with pytest.raises(ValueError, match="memory_budget"):
        Spectre(0.1, memory_budget=0)
    with pytest.raises(ValueError, match="solver must be one of"):
        project_by_class(x, y, None, 1, 16, solver="nope")
    with pytest.raises(ValueError, match="memory_budget"):
        project_by_class(x, y, None, 1, 16, memory_budget=-5)
