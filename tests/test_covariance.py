"""StreamingCovariance (host path) against the float64 two-pass reference ``_reference._covariance``.

Every comparison uses the reference on the same values the accumulator saw (inputs already rounded to their dtype),
per group, with the relative Frobenius tolerances of ``conftest.TOL``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_INPUTS, INPUT_IDS, TOL, make_input, rel_fro, to_float64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poisonguard import _core
from poisonguard._reference import _covariance
from poisonguard.ops import StreamingCovariance

torch = pytest.importorskip("torch")


# -- data ---------------------------------------------------------------------------------------------------------
def _values(rng: np.random.Generator, n: int, d: int, offset: float = 3.0) -> np.ndarray:
    """float64 [n, d]: unequal column spreads around a mean of order ``offset`` (means far from 0 keep relative
    errors of the mean meaningful)."""
    scale = rng.uniform(0.5, 2.0, size=d)
    return rng.standard_normal((n, d)) * scale + offset + rng.uniform(-1.0, 1.0, size=d)


def _group_ids(rng: np.random.Generator, n: int, n_groups: int, mode: str | None, chunk: int = 0):
    if mode is None:
        return None
    if mode == "arange":
        return np.arange(n, dtype=np.int64) % n_groups
    if mode == "even":  # odd ids never appear
        return 2 * rng.integers(0, (n_groups + 1) // 2, size=n)
    if mode == "skewed":  # 95 % of the rows in group 0
        return (rng.random(n) < 0.05).astype(np.int64)
    # later chunks use only the lower half of the ids: the upper groups must keep their state
    hi = n_groups if chunk == 0 else max(1, n_groups // 2)
    return rng.integers(0, hi, size=n)


def _accumulate(chunks, d, n_groups):
    acc = StreamingCovariance(d, n_groups)
    for x, g in chunks:
        assert acc.update(x, g) is acc
    return acc


def _concat(chunks, d):
    xs = [to_float64(x) for x, _ in chunks]
    x = np.concatenate(xs) if xs else np.zeros((0, d))
    if all(g is None for _, g in chunks):
        return x, None
    return x, np.concatenate([np.asarray(to_float64(g), dtype=np.int64) for _, g in chunks])


def _check(acc, x, groups, n_groups, dtype, ddofs=(0, 1), tol=None):
    """count exact; mean, covariance (each ddof) and scatter per group within TOL[dtype]; NaN exactly where the
    reference has NaN (groups with count <= ddof)."""
    d = x.shape[1]
    limit = TOL[dtype] if tol is None else tol
    count = acc.count
    assert count.dtype == np.int64 and count.shape == (n_groups,)
    mean = acc.mean
    assert mean.dtype == np.float64 and mean.shape == (n_groups, d)
    for ddof in ddofs:
        ref_count, ref_mean, ref_cov = _covariance(x, groups, n_groups, ddof=ddof)
        np.testing.assert_array_equal(count, ref_count)
        cov = acc.covariance(ddof=ddof)
        assert cov.dtype == np.float64 and cov.shape == (n_groups, d, d)
        np.testing.assert_array_equal(np.isnan(mean), np.isnan(ref_mean), err_msg="mean: NaN pattern")
        np.testing.assert_array_equal(np.isnan(cov), np.isnan(ref_cov), err_msg=f"cov(ddof={ddof}): NaN pattern")
        for g in range(n_groups):
            if ref_count[g] > 0:
                err = rel_fro(mean[g], ref_mean[g])
                assert err <= limit, f"mean[group {g}]: relative error {err:.3g} > {limit:.3g}"
            if ref_count[g] > ddof:
                err = rel_fro(cov[g], ref_cov[g])
                assert err <= limit, f"cov(ddof={ddof})[group {g}]: relative error {err:.3g} > {limit:.3g}"
                np.testing.assert_array_equal(cov[g], cov[g].T)
    scatter = acc.scatter()
    _, _, ref_cov0 = _covariance(x, groups, n_groups, ddof=0)
    for g in range(n_groups):
        want = ref_cov0[g] * count[g] if count[g] else np.zeros((d, d))
        err = rel_fro(scatter[g], want)
        assert err <= limit, f"scatter[group {g}]: relative error {err:.3g}"


def _chunks(seed, sizes, d, n_groups, mode, lib, dtype, offset=3.0):
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        out.append((make_input(_values(rng, n, d, offset), lib, dtype), _group_ids(rng, n, n_groups, mode, k)))
    return out


# -- against the reference ----------------------------------------------------------------------------------------
# (chunk sizes, d, n_groups, group ids): odd sizes, d = 1, d = 0, empty chunks, chunks of one row, one sample per
# class, classes never seen, rank-deficient groups (n < d), no groups, groups cut into several SYRK calls (> 8192
# rows), later chunks that leave groups out.
CASES = {
    "odd_sizes": ((37, 101, 5), 13, 3, "random"),
    "d1": ((50, 31), 1, 3, "random"),
    "d0": ((10, 4), 0, 3, "random"),
    "empty_chunks": ((0, 21, 0, 7, 0), 5, 2, "random"),
    "rows_of_one": ((1,) * 9, 4, 3, "random"),
    "one_sample_per_class": ((6,), 7, 6, "arange"),
    "never_seen_classes": ((40, 30), 5, 6, "even"),
    "rank_deficient": ((9, 12), 40, 2, "random"),
    "no_groups": ((77, 13), 9, 1, None),
    "long_runs": ((9500, 300), 3, 2, "skewed"),
}


@pytest.mark.parametrize(("lib", "dtype"), ALL_INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, lib, dtype):
    sizes, d, n_groups, mode = CASES[case]
    chunks = _chunks(10, sizes, d, n_groups, mode, lib, dtype)
    acc = _accumulate(chunks, d, n_groups)
    x, g = _concat(chunks, d)
    _check(acc, x, g, n_groups, dtype)


def test_never_seen_and_too_small_groups_are_nan(rng):
    x = _values(rng, 5, 3)
    acc = StreamingCovariance(3, 4).update(x, [0, 0, 2, 0, 2])
    np.testing.assert_array_equal(acc.count, [3, 0, 2, 0])
    mean = acc.mean
    assert np.isnan(mean[[1, 3]]).all() and np.isfinite(mean[[0, 2]]).all()
    cov = acc.covariance(ddof=1)
    assert np.isnan(cov[[1, 3]]).all() and np.isfinite(cov[[0, 2]]).all()
    cov2 = acc.covariance(ddof=2)  # group 2 has count == ddof
    assert np.isnan(cov2[[1, 2, 3]]).all() and np.isfinite(cov2[0]).all()
    # scatter is zero (not NaN) for empty groups
    np.testing.assert_array_equal(acc.scatter()[[1, 3]], 0.0)


def test_single_sample_ddof0_is_zero(rng):
    x = _values(rng, 1, 6)
    acc = StreamingCovariance(6).update(x)
    np.testing.assert_array_equal(acc.covariance(ddof=0)[0], np.zeros((6, 6)))
    assert np.isnan(acc.covariance(ddof=1)).all()
    np.testing.assert_allclose(acc.mean[0], x[0], rtol=1e-15)


@pytest.mark.parametrize("ddof", [0, 1, 2, 5])
def test_ddof(rng, ddof):
    x = _values(rng, 40, 4)
    g = rng.integers(0, 3, size=40)
    g[:3] = 2  # group 2 has exactly 3 rows: NaN for ddof 5 only
    g[3:] = rng.integers(0, 2, size=37)
    acc = StreamingCovariance(4, 3).update(x, g)
    _check(acc, x, g, 3, "float64", ddofs=(ddof,))


# -- layouts ------------------------------------------------------------------------------------------------------
def _layout(values: np.ndarray, layout: str, lib: str, dtype: str):
    """An [n, d] non-contiguous view holding ``values`` (float64 [n, d]) in ``dtype``."""
    n, d = values.shape
    if layout == "cols":
        base = np.zeros((n, 2 * d))
        base[:, ::2] = values
        return make_input(base, lib, dtype)[:, ::2]
    if layout == "rows":
        base = np.zeros((3 * n, d))
        base[::3] = values
        return make_input(base, lib, dtype)[::3]
    if layout == "transposed":
        return make_input(np.ascontiguousarray(values.T), lib, dtype).T
    if layout == "reversed_rows":  # negative strides: numpy only
        return make_input(values[::-1].copy(), lib, dtype)[::-1]
    if layout == "reversed_cols":
        return make_input(values[:, ::-1].copy(), lib, dtype)[:, ::-1]
    if layout == "fortran":
        return np.asfortranarray(make_input(values, lib, dtype))
    raise ValueError(layout)


def _is_contiguous(x) -> bool:
    return x.is_contiguous() if isinstance(x, torch.Tensor) else bool(x.flags.c_contiguous)


LAYOUTS = [
    (layout, lib, dtype)
    for layout in ("cols", "rows", "transposed", "reversed_rows", "reversed_cols", "fortran")
    for lib, dtype in ALL_INPUTS
    if lib == "numpy" or layout in ("cols", "rows", "transposed")
]


@pytest.mark.parametrize(("layout", "lib", "dtype"), LAYOUTS, ids=[f"{a}-{b}-{c}" for a, b, c in LAYOUTS])
def test_non_contiguous(rng, layout, lib, dtype):
    d, n_groups = 11, 3
    vals = [_values(rng, n, d) for n in (57, 30)]
    groups = [rng.integers(0, n_groups, size=len(v)) for v in vals]
    chunks = [(_layout(v, layout, lib, dtype), g) for v, g in zip(vals, groups)]
    for (x, _), v in zip(chunks, vals):
        assert tuple(x.shape) == v.shape and not _is_contiguous(x)
        np.testing.assert_array_equal(to_float64(x), to_float64(make_input(v, lib, dtype)))
    acc = _accumulate(chunks, d, n_groups)
    # The same values, contiguous: the layout must not change the result beyond rounding.
    contiguous = _accumulate([(make_input(v, lib, dtype), g) for v, g in zip(vals, groups)], d, n_groups)
    x, g = _concat(chunks, d)
    _check(acc, x, g, n_groups, dtype)
    np.testing.assert_array_equal(acc.count, contiguous.count)
    assert rel_fro(acc.scatter(), contiguous.scatter()) <= TOL[dtype]


def test_memmap(tmp_path, rng):
    vals = _values(rng, 300, 7).astype(np.float32)
    path = tmp_path / "x.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=vals.shape)
    mm[...] = vals
    mm.flush()
    del mm
    ro = np.load(path, mmap_mode="r")  # read-only memmap
    assert isinstance(ro, np.memmap) and not ro.flags.writeable
    g = rng.integers(0, 2, size=300)
    acc = StreamingCovariance(7, 2).update(ro[:200], g[:200]).update(ro[200:], g[200:])
    _check(acc, vals.astype(np.float64), g, 2, "float32")
    del ro


# -- numerics -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes", [(3001,), (64, 997, 1500, 441), (97,) * 31])
def test_large_mean_offset(dtype, sizes):
    # A mean of 1e4 over a unit spread: the design target is 1e-6 relative error for float32 input (DESIGN §4).
    rng = np.random.default_rng(7)
    n, d = sum(sizes), 17
    x = make_input(rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, size=d) + 1e4, "numpy", dtype)
    g = rng.integers(0, 2, size=n)
    acc = StreamingCovariance(d, 2)
    start = 0
    for s in sizes:
        acc.update(x[start : start + s], g[start : start + s])
        start += s
    _check(acc, to_float64(x), g, 2, dtype, tol=1e-6 if dtype == "float32" else TOL["float64"])


def test_offset_beats_naive_formula():
    # Guard that the offset test can fail: the textbook one-pass formula in float32 is far off on the same data.
    from poisonguard._reference import _naive_covariance

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3001, 17)) + 1e4).astype(np.float32)
    _, _, ref = _covariance(x, None, 1)
    assert rel_fro(_naive_covariance(x), ref[0]) > 1e-2
    assert rel_fro(StreamingCovariance(17).update(x).covariance()[0], ref[0]) <= 1e-6


@pytest.fixture(scope="module")
def wide_float32():
    """d = 2048 float32, 20000 rows: more than one 64 MiB window (8192 rows of 2048 floats)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((20000, 2048), dtype=np.float32)
    x *= rng.uniform(0.5, 2.0, size=2048).astype(np.float32)
    x += np.float32(1.5)
    _, mean, cov = _covariance(x, None, 1)
    return x, mean[0], cov[0]


@pytest.mark.slow
@pytest.mark.parametrize("first", [0, 100], ids=["one_chunk", "after_small_chunk"])
def test_several_windows_float32(wide_float32, first):
    x, mean, cov = wide_float32
    acc = StreamingCovariance(2048)
    if first:
        acc.update(x[:first])
    acc.update(x[first:])
    assert acc.count[0] == 20000
    assert rel_fro(acc.mean[0], mean) <= TOL["float32"]
    assert rel_fro(acc.covariance()[0], cov) <= TOL["float32"]


@pytest.mark.slow
def test_several_windows_float64_groups_across_windows():
    # float64, d = 64: 131072 rows per window; three groups, so window boundaries fall inside groups.
    rng = np.random.default_rng(12)
    n, d = 280_000, 64
    x = rng.standard_normal((n, d)) * 2.0 + 5.0
    g = rng.integers(0, 3, size=n)
    acc = StreamingCovariance(d, 3).update(x, g)
    _check(acc, x, g, 3, "float64", ddofs=(1,))


# -- merge --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_merge_random_splits_any_order(seed):
    rng = np.random.default_rng(100 + seed)
    n, d, n_groups = 203, 6, 3
    x = _values(rng, n, d)
    g = rng.integers(0, n_groups, size=n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 6), replace=False))
    parts = [StreamingCovariance(d, n_groups).update(xs, gs) for xs, gs in zip(np.split(x, cuts), np.split(g, cuts))]
    order = rng.permutation(len(parts))
    merged = StreamingCovariance(d, n_groups)  # starts empty
    for i in order:
        assert merged.merge(parts[i]) is merged
    one_pass = StreamingCovariance(d, n_groups).update(x, g)
    _check(merged, x, g, n_groups, "float64")
    np.testing.assert_array_equal(merged.count, one_pass.count)
    assert rel_fro(merged.scatter(), one_pass.scatter()) <= TOL["float64"]
    # a tree of merges gives the same statistics
    left = StreamingCovariance(d, n_groups)
    for i in order[: len(order) // 2]:
        left.merge(parts[i])
    right = StreamingCovariance(d, n_groups)
    for i in order[len(order) // 2 :]:
        right.merge(parts[i])
    tree = right.merge(left)
    assert rel_fro(tree.scatter(), one_pass.scatter()) <= TOL["float64"]
    assert rel_fro(tree.mean, one_pass.mean) <= TOL["float64"]


def test_merge_into_empty_and_of_empty_is_exact(rng):
    x = _values(rng, 50, 5)
    g = rng.integers(0, 3, size=50)
    a = StreamingCovariance(5, 4).update(x, g)  # group 3 empty
    before = a.state_dict()
    empty = StreamingCovariance(5, 4)
    empty.merge(a)
    for key, want in before.items():
        np.testing.assert_array_equal(empty.state_dict()[key], want)
    a.merge(StreamingCovariance(5, 4))
    for key, want in before.items():
        np.testing.assert_array_equal(a.state_dict()[key], want)


def test_merge_of_self(rng):
    x = _values(rng, 40, 4)
    g = rng.integers(0, 2, size=40)
    a = StreamingCovariance(4, 3).update(x, g)
    state = a.state_dict()
    assert a.merge(a) is a
    np.testing.assert_array_equal(a.count, 2 * state["count"])
    np.testing.assert_array_equal(a.state_dict()["mean"], state["mean"])
    np.testing.assert_array_equal(a.scatter(), 2 * state["m2"])
    _check(a, np.concatenate([x, x]), np.concatenate([g, g]), 3, "float64")


def test_merge_then_update_matches_one_pass(rng):
    x = _values(rng, 90, 5)
    g = rng.integers(0, 2, size=90)
    a = StreamingCovariance(5, 2).update(x[:30], g[:30])
    b = StreamingCovariance(5, 2).update(x[30:60], g[30:60])
    a.merge(b).update(x[60:], g[60:])
    _check(a, x, g, 2, "float64")


# -- persistence --------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_is_exact(rng, tmp_path):
    x = _values(rng, 70, 6).astype(np.float32)
    g = rng.integers(0, 3, size=70)
    acc = StreamingCovariance(6, 4).update(x, g)  # group 3 never seen
    state = acc.state_dict()
    assert set(state) == {"count", "mean", "m2"}
    assert state["count"].dtype == np.int64 and state["count"].shape == (4,)
    assert state["mean"].dtype == np.float64 and state["mean"].shape == (4, 6)
    assert state["m2"].dtype == np.float64 and state["m2"].shape == (4, 6, 6)
    np.testing.assert_array_equal(state["m2"], state["m2"].transpose(0, 2, 1))
    restored = StreamingCovariance.from_state_dict(state)
    assert (restored.n_features, restored.n_groups) == (6, 4)
    for key, want in state.items():
        np.testing.assert_array_equal(restored.state_dict()[key], want)
    np.testing.assert_array_equal(restored.covariance(), acc.covariance())
    np.testing.assert_array_equal(restored.mean, acc.mean)
    # the state is a copy: mutating it does not touch the accumulator
    state["count"][0] += 5
    assert acc.count[0] == state["count"][0] - 5
    # np.savez / np.load without pickle
    path = tmp_path / "state.npz"
    np.savez(path, **acc.state_dict())
    with np.load(path, allow_pickle=False) as f:
        loaded = StreamingCovariance.from_state_dict({k: f[k] for k in f.files})
    for key, want in acc.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], want)
    # both continue identically
    y = _values(rng, 25, 6).astype(np.float32)
    h = rng.integers(0, 4, size=25)
    acc.update(y, h)
    loaded.update(y, h)
    for key, want in acc.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], want)


def _good_state():
    acc = StreamingCovariance(3, 2).update(np.arange(12, dtype=np.float64).reshape(4, 3) ** 1.5, [0, 1, 0, 1])
    return acc.state_dict()


def _mutate(state, key, value):
    out = dict(state)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


BAD_STATES = {
    "missing_m2": lambda s: _mutate(s, "m2", None),
    "extra_key": lambda s: {**s, "extra": np.zeros(1)},
    "count_2d": lambda s: _mutate(s, "count", s["count"][None]),
    "count_empty": lambda s: {"count": np.zeros(0, np.int64), "mean": np.zeros((0, 3)), "m2": np.zeros((0, 3, 3))},
    "count_float": lambda s: _mutate(s, "count", s["count"].astype(np.float64)),
    "mean_wrong_groups": lambda s: _mutate(s, "mean", np.zeros((3, 3))),
    "mean_1d": lambda s: _mutate(s, "mean", np.zeros(3)),
    "m2_wrong_shape": lambda s: _mutate(s, "m2", np.zeros((2, 3, 4))),
    "m2_wrong_groups": lambda s: _mutate(s, "m2", np.zeros((1, 3, 3))),
    "negative_count": lambda s: _mutate(s, "count", np.array([-1, 2], np.int64)),
    "nan_mean": lambda s: _mutate(s, "mean", np.where(np.eye(2, 3, dtype=bool), np.nan, s["mean"])),
    "inf_m2": lambda s: _mutate(s, "m2", s["m2"] + np.array([0, np.inf])[:, None, None]),
    "complex_mean": lambda s: _mutate(s, "mean", s["mean"].astype(np.complex128)),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_from_state_dict_rejects_bad_state(case):
    state = BAD_STATES[case](_good_state())
    with pytest.raises(ValueError, match="state"):
        StreamingCovariance.from_state_dict(state)


def test_from_state_dict_rejects_non_mapping():
    with pytest.raises(TypeError):
        StreamingCovariance.from_state_dict([np.zeros(1), np.zeros((1, 1)), np.zeros((1, 1, 1))])


def test_good_state_is_accepted():
    # the mutations above start from a state that is valid as is
    acc = StreamingCovariance.from_state_dict(_good_state())
    np.testing.assert_array_equal(acc.count, [2, 2])


# -- bad input ----------------------------------------------------------------------------------------------------
def _state(acc):
    return acc.state_dict()


def _assert_same_state(acc, before):
    after = acc.state_dict()
    for key, want in before.items():
        np.testing.assert_array_equal(after[key], want, err_msg=key)


@pytest.mark.parametrize(("lib", "dtype"), ALL_INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize(
    "bad",
    [
        {3: np.nan},
        {0: np.inf},
        {17: -np.inf, 3: np.nan, 39: np.nan},
        {5: np.nan, 6: np.inf},
    ],
    ids=["nan", "inf_first_row", "three_rows", "first_row_of_new_group"],
)
def test_non_finite_rows_rejected_state_unchanged(rng, lib, dtype, bad):
    d = 5
    acc = StreamingCovariance(d, 3).update(make_input(_values(rng, 30, d), lib, dtype), rng.integers(0, 2, size=30))
    before = _state(acc)
    vals = _values(rng, 40, d)
    for row, value in bad.items():
        vals[row, row % d] = value
    g = rng.integers(0, 2, size=40)
    g[5] = g[6] = 2  # rows 5 and 6 start group 2, never seen before
    first = min(bad)
    with pytest.raises(ValueError, match=rf"NaN or Inf in {len(bad)} row\(s\) \(first at row {first}\)"):
        acc.update(make_input(vals, lib, dtype), g)
    _assert_same_state(acc, before)
    # the accumulator still works afterwards
    clean = _values(rng, 10, d)
    acc.update(clean, np.zeros(10, np.int64))
    assert acc.count.sum() == 40


@pytest.mark.slow
@pytest.mark.parametrize("rows", [[5], [2_100_000, 2_150_000, 2_200_000]], ids=["first_window", "last_window"])
def test_non_finite_rows_rejected_several_windows(rows):
    # float16 input, d = 8: a window holds 64 MiB / (8 · 4 B) = 2**21 rows of the float32 working copy.
    rng = np.random.default_rng(13)
    n, d = 2_200_001, 8
    x = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
    acc = StreamingCovariance(d).update(x[:1000])
    before = _state(acc)
    for r in rows:
        x[r, r % d] = np.nan
    with pytest.raises(ValueError, match=rf"NaN or Inf in {len(rows)} row\(s\) \(first at row {rows[0]}\)"):
        acc.update(x)
    _assert_same_state(acc, before)


@pytest.mark.parametrize("bad_id", [-1, 3, 100])
@pytest.mark.parametrize("as_torch", [False, True])
def test_group_ids_out_of_range(rng, bad_id, as_torch):
    acc = StreamingCovariance(4, 3).update(_values(rng, 20, 4), rng.integers(0, 3, size=20))
    before = _state(acc)
    g = rng.integers(0, 3, size=12)
    g[7] = bad_id
    g[10] = bad_id
    groups = torch.from_numpy(g) if as_torch else g
    with pytest.raises(ValueError, match=rf"2 id\(s\).*first {bad_id} at row 7"):
        acc.update(_values(rng, 12, 4), groups)
    _assert_same_state(acc, before)


def test_kernel_rejects_bad_group_ids_without_touching_state(rng):
    # C++ repeats the check (DESIGN §3.3): straight to _core, bypassing the Python validation.
    acc = StreamingCovariance(3, 2).update(_values(rng, 10, 3), rng.integers(0, 2, size=10))
    count, mean, m2 = acc._count.copy(), acc._mean.copy(), acc._m2.copy()
    g = np.array([0, 1, 2, 0], dtype=np.int64)
    with pytest.raises(ValueError, match="at row 2"):
        _core.covariance_update(_values(rng, 4, 3), g, acc._count, acc._mean, acc._m2, False)
    np.testing.assert_array_equal(acc._count, count)
    np.testing.assert_array_equal(acc._mean, mean)
    np.testing.assert_array_equal(acc._m2, m2)


@pytest.mark.parametrize(
    "x",
    [np.zeros(5), np.zeros((2, 3, 4)), np.zeros(()), "torch_1d", "torch_3d"],
    ids=["1d", "3d", "0d", "torch_1d", "torch_3d"],
)
def test_wrong_ndim(x):
    if isinstance(x, str):
        x = {"torch_1d": torch.zeros(5), "torch_3d": torch.zeros(2, 3, 4)}[x]
    with pytest.raises(ValueError, match="2-D"):
        StreamingCovariance(3).update(x)


def test_groups_length_mismatch(rng):
    with pytest.raises(ValueError, match="3 entries but x has 4 rows"):
        StreamingCovariance(2, 2).update(_values(rng, 4, 2), [0, 1, 0])
    with pytest.raises(ValueError, match="1-D"):
        StreamingCovariance(2, 2).update(_values(rng, 4, 2), np.zeros((4, 1), np.int64))


def test_feature_mismatch(rng):
    acc = StreamingCovariance(3)
    with pytest.raises(ValueError, match="4 features"):
        acc.update(_values(rng, 5, 4))
    with pytest.raises(ValueError, match="n_features"):
        acc.merge(StreamingCovariance(4))
    with pytest.raises(ValueError, match="n_groups"):
        acc.merge(StreamingCovariance(3, 2))
    with pytest.raises(TypeError):
        acc.merge(acc.state_dict())
    assert acc.count.sum() == 0


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((3, 2), np.int32),
        np.zeros((3, 2), np.int64),
        np.zeros((3, 2), bool),
        np.zeros((3, 2), object),
        np.zeros((3, 2), np.complex64),
        np.zeros((3, 2), np.complex128),
        np.zeros((3, 2), ">f8"),
        "torch_int",
        "torch_bool",
        "torch_complex",
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        ((1.0, 2.0),),
        3.0,
    ],
    ids=["i32", "i64", "bool", "object", "c64", "c128", "big_endian", "torch_int", "torch_bool", "torch_complex",
         "list", "tuple", "scalar"],
)  # fmt: skip
def test_bad_x_type(x):
    if isinstance(x, str):
        x = {"torch_int": torch.zeros(3, 2, dtype=torch.int64), "torch_bool": torch.zeros(3, 2, dtype=torch.bool),
             "torch_complex": torch.zeros(3, 2, dtype=torch.complex64)}[x]  # fmt: skip
    acc = StreamingCovariance(2)
    with pytest.raises(TypeError):
        acc.update(x)
    assert acc.count.sum() == 0


@pytest.mark.parametrize(
    "groups",
    [np.zeros(3), np.zeros(3, np.float32), np.zeros(3, bool), [0.0, 1.0, 0.0], "torch_float", "torch_bool"],
    ids=["f64", "f32", "bool", "float_list", "torch_float", "torch_bool"],
)
def test_float_groups_rejected(rng, groups):
    if isinstance(groups, str):
        groups = {"torch_float": torch.zeros(3), "torch_bool": torch.zeros(3, dtype=torch.bool)}[groups]
    acc = StreamingCovariance(2, 2)
    with pytest.raises(TypeError, match="integer"):
        acc.update(_values(rng, 3, 2), groups)


def test_groups_required_with_several_groups(rng):
    with pytest.raises(ValueError, match="groups is required"):
        StreamingCovariance(2, 3).update(_values(rng, 3, 2))
    # one group: None means group 0
    acc = StreamingCovariance(2).update(_values(rng, 3, 2))
    np.testing.assert_array_equal(acc.count, [3])


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((-1,), ValueError),
        ((3, 0), ValueError),
        ((3, -2), ValueError),
        ((2.0,), TypeError),
        (("3",), TypeError),
        ((True,), TypeError),
        ((3, 1.5), TypeError),
        ((None,), TypeError),
    ],
)
def test_bad_constructor_arguments(args, exc):
    with pytest.raises(exc):
        StreamingCovariance(*args)


def test_constructor_accepts_numpy_integers():
    acc = StreamingCovariance(np.int64(4), np.int32(2))
    assert (acc.n_features, acc.n_groups) == (4, 2)


@pytest.mark.parametrize(("ddof", "exc"), [(-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_ddof(rng, ddof, exc):
    acc = StreamingCovariance(2).update(_values(rng, 5, 2))
    with pytest.raises(exc):
        acc.covariance(ddof=ddof)


# -- group id forms -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["list", "int32", "uint8", "torch_int32", "torch_int64", "strided"])
def test_group_id_forms(rng, form):
    x = _values(rng, 30, 3)
    g = rng.integers(0, 3, size=30)
    groups = {
        "list": g.tolist(),
        "int32": g.astype(np.int32),
        "uint8": g.astype(np.uint8),
        "torch_int32": torch.from_numpy(g.astype(np.int32)),
        "torch_int64": torch.from_numpy(g),
        "strided": np.repeat(g, 2)[::2],
    }[form]
    acc = StreamingCovariance(3, 3).update(x, groups)
    _check(acc, x, g, 3, "float64")


def test_empty_chunk_changes_nothing(rng):
    acc = StreamingCovariance(4, 2).update(_values(rng, 10, 4), rng.integers(0, 2, size=10))
    before = _state(acc)
    assert acc.update(np.zeros((0, 4)), np.zeros(0, np.int64)) is acc
    assert acc.update(torch.zeros(0, 4, dtype=torch.bfloat16), np.zeros(0, np.int64)) is acc
    _assert_same_state(acc, before)


def test_repr(rng):
    acc = StreamingCovariance(4, 2).update(_values(rng, 10, 4), rng.integers(0, 2, size=10))
    assert repr(acc) == "StreamingCovariance(n_features=4, n_groups=2, samples=10, state_on=cpu)"


def test_results_are_copies(rng):
    acc = StreamingCovariance(3).update(_values(rng, 10, 3))
    acc.mean[...] = 0
    acc.count[...] = 0
    acc.covariance()[...] = 0
    acc.scatter()[...] = 0
    assert acc.count[0] == 10 and np.all(acc.mean != 0) and np.all(np.diag(acc.covariance()[0]) > 0)


# -- fuzzing ------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    d=st.integers(0, 9),
    n_groups=st.integers(1, 4),
    sizes=st.lists(st.integers(0, 25), min_size=1, max_size=5),
    dtype=st.sampled_from(list(range(len(ALL_INPUTS)))),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz(d, n_groups, sizes, dtype, seed):
    lib, dt = ALL_INPUTS[dtype]
    chunks = _chunks(seed, sizes, d, n_groups, "random", lib, dt)
    acc = _accumulate(chunks, d, n_groups)
    x, g = _concat(chunks, d)
    _check(acc, x, g, n_groups, dt)
    # and split/merged the other way round: every chunk in its own accumulator, merged in reverse order
    merged = StreamingCovariance(d, n_groups)
    for c in reversed(chunks):
        merged.merge(_accumulate([c], d, n_groups))
    _check(merged, x, g, n_groups, dt)


def test_staging_reused_by_a_new_accumulator_starts_clean():
    # A dropped accumulator's staging buffers go to the next one of the same shape: nothing of the old data may leak.
    import gc

    from poisonguard.ops import covariance as cov_mod

    rng = np.random.default_rng(77)
    d, g = 24, 3
    cov_mod._STAGING_POOL.clear()
    old = StreamingCovariance(d, g)
    old.update(rng.standard_normal((500, d)).astype(np.float32) + 50, rng.integers(0, g, 500))
    staging = old._pending
    assert staging is not None and staging[1].any()  # rows are staged, not merged yet
    del old
    gc.collect()
    x = rng.standard_normal((300, d)).astype(np.float32)
    labels = rng.integers(0, g, 300)
    new = StreamingCovariance(d, g)
    assert new._pending is staging  # the same buffers
    new.update(x, labels)
    count, mean, cov = _covariance(x, labels, g)
    np.testing.assert_array_equal(new.count, count)
    np.testing.assert_allclose(new.mean, mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(new.covariance(), cov, rtol=0, atol=1e-5)
    assert cov_mod._STAGING_POOL.get((g, staging[0].shape[1], d)) is None  # taken, not shared
