"""StreamingCovariance on CUDA tensors against the CPU kernel fed the same values (the CPU kernel is the
reference).

Every case streams the data in chunks (so the merge with an existing state runs too); the second chunk leaves
some groups out, which must keep their state. Skipped without torch, a CUDA device or a CUDA build.
"""

from __future__ import annotations

import warnings

import numpy as np
import poisonguard
import pytest
from poisonguard.ops import StreamingCovariance

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and poisonguard.has_cuda()),
        reason="needs a CUDA device and poisonguard built with POISONGUARD_CUDA=ON",
    ),
]

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# float64: elementwise rtol (atol scaled to the array); narrower inputs (float32 compute): relative Frobenius.
F64_RTOL = 1e-10
F32_REL_FRO = 1e-5
# A mean offset that the input dtype can still resolve next to a unit spread.
BIG_OFFSET = {"float16": 8.0, "bfloat16": 8.0, "float32": 1e4, "float64": 1e4}


# -- data ----------------------------------------------------------------------------------------------------
def _base(rng: np.random.Generator, n: int, d: int, layout: str, offset: float) -> torch.Tensor:
    """Float64 CPU tensor whose `_view(..., layout)` is the [n, d] chunk."""
    shape = {"contiguous": (n, d), "cols": (n, 2 * d), "rows": (2 * n, d), "transposed": (d, n)}[layout]
    scale = rng.uniform(0.5, 2.0, size=shape[-1])  # unequal column spreads
    return torch.from_numpy(rng.standard_normal(shape) * scale + offset)


def _view(base: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "cols":
        return base[:, ::2]
    if layout == "rows":
        return base[::2]
    if layout == "transposed":
        return base.T
    return base


def _chunks(seed, sizes, d, n_groups, dtype, layout="contiguous", offset=0.0, groups="random"):
    """[(x_cpu, x_cuda, g_cpu, g_cuda)] with equal values; x_cuda has the same layout (a view of a copy)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        base = _base(rng, n, d, layout, offset).to(DTYPES[dtype])
        x_cpu, x_cuda = _view(base, layout), _view(base.cuda(), layout)
        assert x_cuda.shape == (n, d) and x_cuda.stride() == x_cpu.stride()
        if groups is None:
            g = None
        elif groups == "arange":
            g = torch.arange(n, dtype=torch.int64) % n_groups
        elif groups == "even":
            # Only even ids: the odd groups are never seen (NaN mean and covariance on both sides).
            g = torch.from_numpy(2 * rng.integers(0, (n_groups + 1) // 2, size=n).astype(np.int64))
        elif groups == "skewed":
            g = torch.from_numpy((rng.random(n) < 0.1).astype(np.int64))  # 90 % of the rows in group 0
        else:
            # Later chunks use only the lower half of the ids: the upper groups must keep their state.
            hi = n_groups if k == 0 else max(1, n_groups // 2)
            g = torch.from_numpy(rng.integers(0, hi, size=n).astype(np.int64))
        out.append((x_cpu, x_cuda, g, None if g is None else g.cuda()))
    return out


def _accumulate(chunks, d, n_groups, on_cuda):
    acc = StreamingCovariance(d, n_groups)
    for x_cpu, x_cuda, g_cpu, g_cuda in chunks:
        returned = acc.update(x_cuda, g_cuda) if on_cuda else acc.update(x_cpu, g_cpu)
        assert returned is acc
    return acc


# -- comparison ----------------------------------------------------------------------------------------------
def _results(acc):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN for groups without enough rows
        return {"count": acc.count, "mean": acc.mean, "cov": acc.covariance(), "scatter": acc.scatter()}


def _assert_close(name, got, want, dtype):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pattern differs")
    got, want = np.nan_to_num(got), np.nan_to_num(want)
    if dtype == "float64":
        atol = F64_RTOL * max(float(np.abs(want).max(initial=0.0)), 1e-300)
        np.testing.assert_allclose(got, want, rtol=F64_RTOL, atol=atol, err_msg=name)
        return
    # Per group, so that a small group's error cannot hide behind a big one.
    for g in range(want.shape[0]):
        ref = float(np.linalg.norm(want[g]))
        err = float(np.linalg.norm(got[g] - want[g]))
        if ref == 0.0:
            assert err <= 1e-12, f"{name}[group {g}]: expected zeros, error {err:.3g}"
        else:
            assert err <= F32_REL_FRO * ref, f"{name}[group {g}]: relative Frobenius error {err / ref:.3g}"


def _check(chunks, d, n_groups, dtype):
    gpu = _results(_accumulate(chunks, d, n_groups, on_cuda=True))
    cpu = _results(_accumulate(chunks, d, n_groups, on_cuda=False))
    np.testing.assert_array_equal(gpu["count"], cpu["count"])
    assert gpu["count"].dtype == np.int64
    assert gpu["mean"].dtype == np.float64 and gpu["cov"].dtype == np.float64
    assert gpu["mean"].shape == (n_groups, d) and gpu["cov"].shape == (n_groups, d, d)
    for key in ("mean", "cov", "scatter"):
        _assert_close(key, gpu[key], cpu[key], dtype)


# -- tests ---------------------------------------------------------------------------------------------------
# (chunk sizes, d, n_groups, groups): odd sizes, n = 0, d = 1, one row per group, empty groups, rank-deficient
# groups (d > rows), groups cut into SYRK pieces (> 1024 rows), several column tiles, no groups, d = 0.
CASES = {
    "empty_first_chunk": ((0, 40), 6, 2, "random"),
    "d1": ((50, 31), 1, 3, "random"),
    "one_row_per_group": ((6, 6), 7, 6, "arange"),
    "empty_groups": ((200, 150), 33, 7, "random"),
    "never_seen_groups": ((120, 80), 5, 6, "even"),
    "rank_deficient": ((40, 9), 100, 4, "random"),
    "odd_tiles": ((301, 77), 65, 3, "random"),
    "many_pieces": ((5000, 2500), 8, 2, "skewed"),
    "many_pieces_tiles": ((3000, 1100), 130, 2, "random"),
    "no_groups": ((777, 13), 19, 1, None),
    "no_features": ((10, 4), 0, 3, "random"),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_cpu(case, dtype):
    sizes, d, n_groups, groups = CASES[case]
    _check(_chunks(1, sizes, d, n_groups, dtype, groups=groups), d, n_groups, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["cols", "rows", "transposed"])
def test_non_contiguous(layout, dtype):
    _check(_chunks(2, (513, 200), 37, 3, dtype, layout=layout), 37, 3, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_large_mean_offset(dtype):
    chunks = _chunks(3, (2500, 700, 1300), 70, 3, dtype, offset=BIG_OFFSET[dtype])
    _check(chunks, 70, 3, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_against_float64_two_pass(dtype):
    # Independent of the CPU kernel: the design target, 1e-6 relative error next to a float64 two-pass result.
    chunks = _chunks(4, (3000, 1000), 24, 2, dtype, offset=1e4)
    acc = _accumulate(chunks, 24, 2, on_cuda=True)
    x = torch.cat([c[0] for c in chunks]).double().numpy()
    g = torch.cat([c[2] for c in chunks]).numpy()
    for k in range(2):
        xk = x[g == k]
        mu = xk.mean(axis=0)
        cov = (xk - mu).T @ (xk - mu) / (len(xk) - 1)
        np.testing.assert_allclose(acc.mean[k], mu, rtol=1e-12)
        assert np.linalg.norm(acc.covariance()[k] - cov) <= 1e-6 * np.linalg.norm(cov)


def test_empty_chunk_changes_nothing():
    chunks = _chunks(5, (100,), 6, 2, "float32")
    acc = _accumulate(chunks, 6, 2, on_cuda=True)
    before = _results(acc)
    acc.update(torch.empty((0, 6), device="cuda"), torch.empty((0,), dtype=torch.int64, device="cuda"))
    after = _results(acc)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deterministic(dtype):
    chunks = _chunks(6, (6000, 3000), 96, 3, dtype)
    a = _accumulate(chunks, 96, 3, on_cuda=True).state_dict()
    b = _accumulate(chunks, 96, 3, on_cuda=True).state_dict()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_runs_on_current_stream():
    chunks = _chunks(7, (400, 90), 12, 2, "float32")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were copied on the default stream
    with torch.cuda.stream(stream):
        acc = _accumulate(chunks, 12, 2, on_cuda=True)
        got = _results(acc)  # read back on the side stream, where the kernels were queued
    want = _results(_accumulate(chunks, 12, 2, on_cuda=False))
    np.testing.assert_array_equal(got["count"], want["count"])
    for key in ("mean", "cov"):
        _assert_close(key, got[key], want[key], "float32")
