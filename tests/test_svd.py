"""randomized_svd / top_eigh / svd_method and the C++ building blocks against the float64 references.

Inputs narrower than float64 are compared with the reference computed on the rounded values (what the op saw).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALL_INPUTS, INPUT_IDS, make_input, rel_fro, to_float64
from poisonguard import _core
from poisonguard._reference import _gram, _power_pass, _randomized_svd, _top_eigh, subspace_error
from poisonguard.ops import randomized_svd, svd_method, top_eigh

torch = pytest.importorskip("torch")

# Singular values: max elementwise relative error; vectors: sine of the largest principal angle; orthonormality:
# max |QᵀQ − I|. float64 subspace errors cannot go below ~1e-8 (the measure takes a square root).
S_TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
SUB_TOL = {"float64": 1e-7, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}
ORTHO_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}
METHODS = ("gram", "randomized")
SHAPES = {"tall": (203, 61), "wide": (61, 203), "square": (64, 64)}


# -- data ---------------------------------------------------------------------------------------------------------
def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def _decaying(rng: np.random.Generator, m: int, n: int, scale: float = 10.0, decay: float = 0.8, noise: float = 1e-6):
    """U diag(s) Vᵀ with s_i = scale·decay**i, plus a little Gaussian noise: a clear gap between consecutive values."""
    r = min(m, n)
    s = scale * decay ** np.arange(r)
    return (_orthonormal(rng, m, r) * s) @ _orthonormal(rng, n, r).T + noise * rng.standard_normal((m, n))


def _ortho_err(q: np.ndarray) -> float:
    q = to_float64(q)
    return float(np.abs(q.T @ q - np.eye(q.shape[1])).max())


def _max_rel(got, want) -> float:
    got, want = to_float64(got), to_float64(want)
    return float(np.max(np.abs(got - want) / np.abs(want)))


def _svd(a, k, **kw):
    u, s, vt = randomized_svd(a, k, **kw)
    return to_float64(u), to_float64(s), to_float64(vt)


def _check_svd(a, u, s, vt, k, dtype):
    ref_u, ref_s, ref_vt = _randomized_svd(a, k)
    m, n = tuple(a.shape)
    assert u.shape == (m, k) and s.shape == (k,) and vt.shape == (k, n)
    assert np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(vt).all()
    assert np.all(np.diff(s) <= 0), f"singular values not descending: {s}"
    err = _max_rel(s, ref_s)
    assert err <= S_TOL[dtype], f"singular values: relative error {err:.3g}"
    for name, got, want in (("U", u, ref_u), ("V", vt.T, ref_vt.T)):
        err = subspace_error(got, want)
        assert err <= SUB_TOL[dtype], f"{name}: subspace error {err:.3g}"
        err = _ortho_err(got)
        assert err <= ORTHO_TOL[dtype], f"{name}: orthonormality error {err:.3g}"
    # the triplets belong together: A v_j = s_j u_j
    av = to_float64(a) @ vt.T
    err = rel_fro(av, u * s)
    assert err <= 10 * SUB_TOL[dtype], f"A V != U S: {err:.3g}"


# -- randomized_svd -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lib", "dtype"), ALL_INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_randomized_svd_matches_reference(shape, method, lib, dtype):
    rng = np.random.default_rng(20)
    a = make_input(_decaying(rng, *SHAPES[shape]), lib, dtype)
    u, s, vt = randomized_svd(a, 6, method=method)
    want = "float64" if dtype == "float64" else "float32"
    for out in (u, s, vt):
        if lib == "torch":
            assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
            assert out.dtype == getattr(torch, want)
        else:
            assert isinstance(out, np.ndarray) and out.dtype == np.dtype(want)
    _check_svd(a, to_float64(u), to_float64(s), to_float64(vt), 6, dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape",
    [
        "tall",
        "square",
        "wide",
    ],
)
def test_sign_convention(shape, method):
    # Each right singular vector (row of Vt) has its largest-magnitude entry positive.
    rng = np.random.default_rng(21)
    a = _decaying(rng, *SHAPES[shape])
    _, _, vt = randomized_svd(a, 8, method=method)
    top = vt[np.arange(8), np.abs(vt).argmax(axis=1)]
    assert np.all(top > 0), f"rows of Vt whose largest-|.| entry is negative: {np.flatnonzero(top <= 0)}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (30, 30)])
def test_k_equals_min_dimension(shape, method):
    rng = np.random.default_rng(22)
    a = rng.standard_normal(shape)
    k = min(shape)
    u, s, vt = _svd(a, k, method=method)
    _check_svd(a, u, s, vt, k, "float64")
    assert rel_fro((u * s) @ vt, a) <= 1e-12


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_rank_deficient(shape, method, dtype):
    rng = np.random.default_rng(23)
    m, n = SHAPES[shape]
    a = (rng.standard_normal((m, 2)) @ rng.standard_normal((2, n))).astype(dtype)
    u, s, vt = _svd(a, 5, method=method)
    assert np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(vt).all()
    ref_u, ref_s, ref_vt = _randomized_svd(a, 2)
    assert _max_rel(s[:2], ref_s) <= S_TOL[dtype]
    # Null directions: at the rounding floor (the Gram route squares it: ~sqrt(eps) relative).
    assert np.all(s[2:] <= (1e-6 if dtype == "float64" else 1e-3) * s[0])
    assert subspace_error(u[:, :2], ref_u) <= SUB_TOL[dtype]
    assert subspace_error(vt[:2].T, ref_vt.T) <= SUB_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["zeros", "zero_lines"])
@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_exact_zero_singular_values_give_zero_u(shape, kind, method, dtype):
    rng = np.random.default_rng(24)
    m, n = SHAPES[shape]
    a = np.zeros((m, n), dtype=dtype)
    rank = 0
    if kind == "zero_lines":  # rank 3: the other columns (tall) / rows (wide) are exactly zero
        rank = 3
        if shape == "tall":
            a[:, :3] = rng.standard_normal((m, 3))
        else:
            a[:3, :] = rng.standard_normal((3, n))
    u, s, vt = _svd(a, 6, method=method)
    assert np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(vt).all()
    np.testing.assert_array_equal(s[rank:], 0.0)
    assert np.all(s[:rank] > 0)
    np.testing.assert_array_equal(u[:, rank:], 0.0)
    if rank:
        assert rel_fro((u * s) @ vt, a) <= (1e-12 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_deterministic(method, lib):
    rng = np.random.default_rng(25)
    a = make_input(_decaying(rng, 150, 70), lib, "float32")
    first = randomized_svd(a, 5, method=method, seed=3)
    for _ in range(2):
        again = randomized_svd(a, 5, method=method, seed=3)
        for x, y in zip(first, again):
            np.testing.assert_array_equal(to_float64(x), to_float64(y))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40])
def test_other_seeds_still_accurate(seed):
    rng = np.random.default_rng(26)
    a = _decaying(rng, 250, 90)
    u, s, vt = _svd(a, 5, method="randomized", seed=seed)
    _check_svd(a, u, s, vt, 5, "float64")


def test_seed_changes_the_sketch():
    # Guard that the determinism test can fail: with n_iter=0 the sketch shows through in the last digits.
    rng = np.random.default_rng(27)
    a = _decaying(rng, 120, 60, decay=0.97)
    _, s0, _ = randomized_svd(a, 5, method="randomized", n_iter=0, seed=0)
    _, s1, _ = randomized_svd(a, 5, method="randomized", n_iter=0, seed=1)
    assert not np.array_equal(s0, s1)


@pytest.mark.parametrize(
    "layout", ["cols", "rows", "transposed", "reversed_rows", "fortran", "torch_cols", "torch_transposed"]
)
@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous(layout, method):
    rng = np.random.default_rng(28)
    m, n = 151, 47
    vals = _decaying(rng, m, n).astype(np.float32)
    if layout == "cols":
        base = np.zeros((m, 2 * n), np.float32)
        base[:, ::2] = vals
        a = base[:, ::2]
    elif layout == "rows":
        base = np.zeros((2 * m, n), np.float32)
        base[::2] = vals
        a = base[::2]
    elif layout == "transposed":
        a = np.ascontiguousarray(vals.T).T
    elif layout == "reversed_rows":
        a = vals[::-1].copy()[::-1]
    elif layout == "fortran":
        a = np.asfortranarray(vals)
    elif layout == "torch_cols":
        base = torch.zeros(m, 2 * n)
        base[:, ::2] = torch.from_numpy(vals)
        a = base[:, ::2]
    else:
        a = torch.from_numpy(np.ascontiguousarray(vals.T)).T
    contiguous = a.is_contiguous() if isinstance(a, torch.Tensor) else a.flags.c_contiguous
    assert not contiguous
    np.testing.assert_array_equal(to_float64(a), vals)
    u, s, vt = _svd(a, 5, method=method)
    _check_svd(vals, u, s, vt, 5, "float32")


def test_torch_input_keeps_autograd_tensor_untouched():
    rng = np.random.default_rng(29)
    t = torch.from_numpy(_decaying(rng, 60, 30)).requires_grad_(True)
    u, s, vt = randomized_svd(t, 3)
    assert all(isinstance(x, torch.Tensor) and not x.requires_grad for x in (u, s, vt))
    assert t.grad is None
    _check_svd(t.detach().numpy(), u.numpy(), s.numpy(), vt.numpy(), 3, "float64")


@pytest.mark.parametrize("method", METHODS)
def test_nan_or_inf_rejected(method):
    rng = np.random.default_rng(30)
    for bad in (np.nan, np.inf):
        for shape in ((50, 20), (20, 50)):
            a = rng.standard_normal(shape)
            a[7, 3] = bad
            with pytest.raises(ValueError, match="NaN or Inf"):
                randomized_svd(a, 3, method=method)
            with pytest.raises(ValueError, match="NaN or Inf"):
                randomized_svd(a, 3, method=method, n_iter=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"k": 0}, ValueError, "k"),
        ({"k": -1}, ValueError, "k"),
        ({"k": 21}, ValueError, "at most"),
        ({"k": 2.0}, TypeError, "k"),
        ({"k": True}, TypeError, "k"),
        ({"k": 3, "n_iter": -1}, ValueError, "n_iter"),
        ({"k": 3, "n_oversamples": -1}, ValueError, "n_oversamples"),
        ({"k": 3, "seed": -1}, ValueError, "seed"),
        ({"k": 3, "seed": 1.5}, TypeError, "seed"),
        ({"k": 3, "method": "qr"}, ValueError, "method"),
        ({"k": 3, "method": None}, ValueError, "method"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    a = np.random.default_rng(31).standard_normal((50, 20))
    k = kwargs.pop("k")
    with pytest.raises(exc, match=match):
        randomized_svd(a, k, **kwargs)
    with pytest.raises(exc, match=match):
        randomized_svd(a.T, k, **kwargs)


@pytest.mark.parametrize(
    "a",
    [
        np.zeros((5, 4), np.int64),
        np.zeros((5, 4), bool),
        np.zeros((5, 4), np.complex128),
        [[1.0, 2.0], [3.0, 4.0]],
        "torch_int",
    ],
    ids=["int", "bool", "complex", "list", "torch_int"],
)
def test_bad_input_type(a):
    if isinstance(a, str):
        a = torch.zeros(5, 4, dtype=torch.int32)
    with pytest.raises(TypeError):
        randomized_svd(a, 2)


@pytest.mark.parametrize("shape", [(5,), (3, 4, 5)])
def test_bad_input_ndim(shape):
    with pytest.raises(ValueError, match="2-D"):
        randomized_svd(np.zeros(shape), 1)


# -- svd_method ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("m", "n", "k", "p", "q", "want"),
    [
        (100, 30, 5, 10, 4, "gram"),  # l = 15 >= s / 2
        (100, 30, 30, 10, 4, "gram"),  # l capped at s
        (100_000, 100, 5, 10, 4, "gram"),  # m·s²/2 = 5e8 < 9·m·s·l·1.6 = 2.2e9
        (100_000, 2000, 5, 10, 4, "randomized"),  # 2e11 > 4.3e10
        (100_000, 2000, 5, 10, 40, "gram"),  # many iterations make the sketch dearer
        (10_000, 9000, 5, 10, 4, "randomized"),
        (10_000, 9000, 4000, 1000, 4, "randomized"),  # s > 8192: never the Gram route
        (9000, 8192, 4000, 200, 4, "gram"),  # s = 8192 is allowed, l >= s/2
    ],
)
def test_svd_method(m, n, k, p, q, want):
    assert svd_method(m, n, k, p, q) == want
    assert svd_method(n, m, k, p, q) == want  # only the shape's extent matters, not its orientation


@pytest.mark.parametrize("shape", [(2000, 400), (400, 2000), (300, 6), (6, 300)])
def test_auto_follows_svd_method(shape):
    rng = np.random.default_rng(32)
    a = _decaying(rng, *shape)
    k, p, q = 2, 2, 1
    route = svd_method(*shape, k, p, q)
    auto = randomized_svd(a, k, n_oversamples=p, n_iter=q, method="auto")
    explicit = randomized_svd(a, k, n_oversamples=p, n_iter=q, method=route)
    other = randomized_svd(a, k, n_oversamples=p, n_iter=q, method=({"gram", "randomized"} - {route}).pop())
    for x, y in zip(auto, explicit):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(auto, other))


def test_auto_routes_seen():
    # the shapes above cover both routes
    assert svd_method(2000, 400, 2, 2, 1) == "randomized" and svd_method(300, 6, 2, 2, 1) == "gram"


# -- top_eigh -----------------------------------------------------------------------------------------------------
def _psd(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    x = rng.standard_normal((n or 3 * d, d)) * rng.uniform(0.2, 3.0, size=d)
    x -= x.mean(axis=0)
    c = x.T @ x / (len(x) - 1)
    return (c + c.T) / 2


def _decaying_psd(rng: np.random.Generator, d: int, r: int = 40, decay: float = 0.8, floor: float = 1e-6):
    v = _orthonormal(rng, d, r)
    c = (v * decay ** np.arange(r)) @ v.T
    c = (c + c.T) / 2
    c[np.diag_indices(d)] += floor
    return c


def _check_eigh(c, w, v, k, w_tol, sub_tol):
    ref_w, ref_v = _top_eigh(c, k)
    d = c.shape[0]
    assert isinstance(w, np.ndarray) and isinstance(v, np.ndarray)
    assert w.dtype == np.float64 and v.dtype == np.float64
    assert w.shape == (k,) and v.shape == (d, k)
    assert np.all(np.diff(w) <= 0)
    err = _max_rel(w, ref_w)
    assert err <= w_tol, f"eigenvalues: relative error {err:.3g}"
    err = subspace_error(v, ref_v)
    assert err <= sub_tol, f"eigenvectors: subspace error {err:.3g}"
    assert _ortho_err(v) <= 1e-10
    # sign convention: each column's largest-magnitude entry is positive
    assert np.all(v[np.abs(v).argmax(axis=0), np.arange(k)] > 0)
    # eigenpairs belong together
    assert rel_fro(to_float64(c) @ v, v * w) <= 10 * sub_tol


@pytest.mark.parametrize(("lib", "dtype"), ALL_INPUTS, ids=INPUT_IDS)
def test_top_eigh_gram_random_covariance(lib, dtype):
    rng = np.random.default_rng(40)
    c = make_input(_psd(rng, 57), lib, dtype)
    c64 = to_float64(c)
    if not np.array_equal(c64, c64.T):  # rounding keeps symmetry; guard the assumption
        pytest.fail("rounded covariance is not symmetric")
    w, v = top_eigh(c, 5, method="gram")
    _check_eigh(c64, w, v, 5, 1e-12, 1e-7)


@pytest.mark.parametrize(("lib", "dtype"), [("numpy", "float64"), ("numpy", "float32"), ("torch", "float32")])
def test_top_eigh_randomized_small(lib, dtype):
    rng = np.random.default_rng(41)
    c = make_input(_decaying_psd(rng, 120, r=30), lib, dtype)
    w, v = top_eigh(c, 5, method="randomized")
    tol = 1e-10 if dtype == "float64" else 1e-5
    _check_eigh(to_float64(c), w, v, 5, tol, 1e-7 if dtype == "float64" else 1e-4)


@pytest.fixture(scope="module")
def big_psd():
    rng = np.random.default_rng(42)
    c = _decaying_psd(rng, 1500)
    return c, _top_eigh(c, 8)


def test_top_eigh_randomized_d1500(big_psd):
    c, (ref_w, ref_v) = big_psd
    w, v = top_eigh(c, 8, method="randomized")
    assert _max_rel(w, ref_w) <= 1e-10
    assert subspace_error(v, ref_v) <= 1e-7
    assert _ortho_err(v) <= 1e-10
    assert np.all(v[np.abs(v).argmax(axis=0), np.arange(8)] > 0)
    # per vector too (distinct eigenvalues): the same vectors with the same signs
    assert np.abs(v - ref_v * np.sign(ref_v[np.abs(ref_v).argmax(axis=0), np.arange(8)])).max() <= 1e-6
    # auto picks the randomized route here (d > 1024 and 4·l <= d) and gives the same bits
    wa, va = top_eigh(c, 8)
    np.testing.assert_array_equal(wa, w)
    np.testing.assert_array_equal(va, v)


def test_top_eigh_auto_is_exact_for_small_d():
    rng = np.random.default_rng(43)
    c = _psd(rng, 200)
    for x, y in zip(top_eigh(c, 4), top_eigh(c, 4, method="gram")):
        np.testing.assert_array_equal(x, y)


def test_top_eigh_k_equals_d():
    rng = np.random.default_rng(44)
    c = _psd(rng, 9)
    for method in METHODS:
        w, v = top_eigh(c, 9, method=method)
        _check_eigh(c, w, v, 9, 1e-10, 1e-7)
        assert rel_fro((v * w) @ v.T, c) <= 1e-12


@pytest.mark.parametrize(
    ("c", "k", "kwargs", "exc", "match"),
    [
        ("nonsymmetric", 2, {}, ValueError, "symmetric"),
        ("nonsquare", 2, {}, ValueError, "square"),
        ("psd", 0, {}, ValueError, "k"),
        ("psd", 13, {}, ValueError, "at most"),
        ("psd", 2.0, {}, TypeError, "k"),
        ("psd", 2, {"n_iter": -1}, ValueError, "n_iter"),
        ("psd", 2, {"method": "lanczos"}, ValueError, "method"),
        ("int", 2, {}, TypeError, None),
        ("nan", 2, {}, ValueError, "NaN"),
        ("inf", 2, {"method": "randomized"}, ValueError, "NaN or Inf"),
        ("1d", 1, {}, ValueError, "2-D"),
    ],
)
def test_top_eigh_bad_input(c, k, kwargs, exc, match):
    rng = np.random.default_rng(45)
    base = _psd(rng, 12)
    arr = {
        "psd": base,
        "nonsymmetric": base + np.triu(np.ones((12, 12)), 1),
        "nonsquare": base[:, :11],
        "int": np.eye(12, dtype=np.int64),
        "nan": np.where(np.eye(12, dtype=bool), np.nan, base),
        "inf": np.where(np.eye(12, dtype=bool), np.inf, base),
        "1d": base[0],
    }[c]
    with pytest.raises(exc, match=match):
        top_eigh(arr, k, **kwargs)


def test_top_eigh_symmetry_is_checked_relative_to_scale():
    rng = np.random.default_rng(46)
    c = _psd(rng, 10) * 1e6
    c[0, 1] += 1e-4  # 1e-10 of the scale: accepted as symmetric
    w, _ = top_eigh(c, 2)
    assert np.isfinite(w).all()
    c[0, 1] += 1e2 * np.abs(c).max()
    with pytest.raises(ValueError, match="symmetric"):
        top_eigh(c, 2)


# -- C++ building blocks ------------------------------------------------------------------------------------------
def _bf16_view(values: np.ndarray):
    t = torch.from_numpy(values).to(torch.bfloat16)
    return t, t.view(torch.int16).numpy()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("m", [0, 1, 37, 5000])
def test_core_gram(dtype, m):
    rng = np.random.default_rng(50)
    vals = rng.standard_normal((m, 13)) + 2.0
    if dtype == "bfloat16":
        t, arr = _bf16_view(vals)
        g = _core.gram(arr, True)
        ref = _gram(t)
    else:
        arr = vals.astype(dtype)
        g = _core.gram(arr)
        ref = _gram(arr)
    assert g.dtype == np.float64 and g.shape == (13, 13)
    np.testing.assert_array_equal(g, g.T)
    assert rel_fro(g, ref) <= (1e-13 if dtype == "float64" else 1e-6)


def test_core_gram_strided():
    rng = np.random.default_rng(51)
    base = rng.standard_normal((80, 30))
    a = base[::2, ::3]
    assert rel_fro(_core.gram(a), _gram(a)) <= 1e-13
    assert rel_fro(_core.gram(a.T), _gram(a.T)) <= 1e-13


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_core_power_pass(dtype):
    rng = np.random.default_rng(52)
    vals = rng.standard_normal((301, 23))
    ct = np.float64 if dtype == "float64" else np.float32
    q = rng.standard_normal((23, 7)).astype(ct)
    if dtype == "bfloat16":
        t, arr = _bf16_view(vals)
        z = _core.power_pass(arr, q, True)
        ref = _power_pass(t, q)
    else:
        arr = vals.astype(dtype)
        z = _core.power_pass(arr, q)
        ref = _power_pass(arr, q)
    assert z.dtype == np.float64 and z.shape == (23, 7)
    assert rel_fro(z, ref) <= (1e-13 if dtype == "float64" else 1e-5)


def test_core_power_pass_checks_q():
    a = np.ones((10, 4))
    with pytest.raises(TypeError):
        _core.power_pass(a, np.ones((4, 2), np.float32))  # float64 input needs float64 q
    with pytest.raises(TypeError):
        _core.power_pass(a.astype(np.float32), np.ones((4, 2)))  # float32 input needs float32 q
    with pytest.raises(ValueError):
        _core.power_pass(a, np.ones((5, 2)))
    with pytest.raises(ValueError):
        _core.power_pass(a, np.ones((2, 4)).T)  # not C-contiguous
    with pytest.raises(TypeError):
        _core.power_pass(a.astype(np.int64), np.ones((4, 2)))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_core_project(dtype):
    rng = np.random.default_rng(53)
    a = rng.standard_normal((1001, 19)).astype(dtype)
    ct = np.float64 if dtype == "float64" else np.float32
    q = rng.standard_normal((19, 6)).astype(ct)
    y, yty = _core.project(a, q)
    assert y.dtype == ct and y.shape == (1001, 6)
    assert yty.dtype == np.float64 and yty.shape == (6, 6)
    np.testing.assert_array_equal(yty, yty.T)
    tol = 1e-13 if dtype == "float64" else 1e-6
    ref_y = to_float64(a) @ to_float64(q)
    assert rel_fro(y, ref_y) <= tol
    assert rel_fro(yty, ref_y.T @ ref_y) <= tol
    y64 = y.astype(np.float64)
    assert rel_fro(yty, y64.T @ y64) <= tol


def test_core_orthonormalize():
    rng = np.random.default_rng(54)
    q = rng.standard_normal((50, 8)) * np.array([1e-3, 1, 10, 1e3, 1, 1, 2, 3])
    before = q.copy()
    assert _core.orthonormalize(q) is None
    assert not np.array_equal(q, before)  # in place
    assert _ortho_err(q) <= 1e-13
    assert subspace_error(q, before) <= 1e-7
    # a square matrix becomes orthogonal
    s = rng.standard_normal((6, 6))
    _core.orthonormalize(s)
    assert _ortho_err(s) <= 1e-13 and _ortho_err(s.T) <= 1e-13


def test_core_orthonormalize_checks():
    with pytest.raises(ValueError):
        _core.orthonormalize(np.ones((3, 5)))  # n < l
    with pytest.raises(TypeError):
        _core.orthonormalize(np.ones((5, 3), np.float32))
    with pytest.raises(ValueError):
        _core.orthonormalize(np.ones((3, 5)).T)  # not C-contiguous
    ro = np.ones((5, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        _core.orthonormalize(ro)


@pytest.mark.parametrize("k", [0, 1, 4, 30])
def test_core_eigh_top(k):
    rng = np.random.default_rng(55)
    c = _psd(rng, 30)
    c_copy = c.copy()
    w, v = _core.eigh_top(c, k)
    np.testing.assert_array_equal(c, c_copy)  # not modified
    assert w.shape == (k,) and v.shape == (30, k)
    if k == 0:
        return
    ref_w, ref_v = _top_eigh(c, k)
    assert _max_rel(w, ref_w) <= 1e-12
    signs = np.sign(ref_v[np.abs(ref_v).argmax(axis=0), np.arange(k)])
    assert np.abs(v - ref_v * signs).max() <= 1e-8
    assert np.all(v[np.abs(v).argmax(axis=0), np.arange(k)] > 0)


def test_core_eigh_top_reads_upper_triangle_only():
    rng = np.random.default_rng(56)
    c = _psd(rng, 15)
    garbage = np.triu(c) + np.tril(rng.standard_normal((15, 15)) * 100, -1)
    for x, y in zip(_core.eigh_top(c, 3), _core.eigh_top(garbage, 3)):
        np.testing.assert_array_equal(x, y)


def test_core_eigh_top_checks():
    c = np.eye(4)
    with pytest.raises(ValueError):
        _core.eigh_top(c, 5)
    with pytest.raises(ValueError):
        _core.eigh_top(c, -1)
    with pytest.raises(ValueError):
        _core.eigh_top(np.ones((4, 3)), 1)
    with pytest.raises(TypeError):
        _core.eigh_top(c.astype(np.float32), 1)
    with pytest.raises(ValueError):
        _core.eigh_top(np.asfortranarray(np.arange(16.0).reshape(4, 4)), 1)


def test_core_gaussian():
    g = _core.gaussian(7, 400, 250)
    assert g.dtype == np.float64 and g.shape == (400, 250)
    np.testing.assert_array_equal(g, _core.gaussian(7, 400, 250))
    np.testing.assert_array_equal(g.ravel(), _core.gaussian(7, 1, 100_000).ravel())  # depends on (seed, i) only
    np.testing.assert_array_equal(_core.gaussian(7, 1, 7), _core.gaussian(7, 1, 8)[:, :7])  # odd counts
    assert not np.array_equal(g, _core.gaussian(8, 400, 250))
    n = g.size
    assert abs(g.mean()) < 5 / np.sqrt(n)
    assert abs(g.std() - 1) < 5 / np.sqrt(2 * n)
    from scipy import stats

    assert stats.kstest(g.ravel(), "norm").pvalue > 1e-4
    assert _core.gaussian(0, 0, 5).shape == (0, 5)


def test_core_gaussian_is_platform_independent():
    # counter-based splitmix64 + Box–Muller: pinned values (documented as the same on every platform)
    np.testing.assert_allclose(
        _core.gaussian(0, 1, 4)[0],
        [0.10198605372143829, 0.7526570391528555, 1.1145914105332044, 0.6940836965836805],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        _core.gaussian(12345, 1, 3)[0], [1.2945415122693171, -0.44154310098203303, 1.442371192926146], rtol=1e-12
    )


def test_core_gaussian_checks():
    with pytest.raises(ValueError):
        _core.gaussian(0, -1, 3)
    with pytest.raises(TypeError):
        _core.gaussian(-1, 2, 3)  # seeds are unsigned


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_torch_device_path_on_cpu_tensors(method, shape):
    # The CUDA route is plain torch code; on CPU tensors it must match the reference too.
    import torch
    from poisonguard.ops.svd import _randomized_svd_torch

    rng = np.random.default_rng(31)
    m, n = shape
    a = _decaying(rng, m, n)
    u, s, vt = _randomized_svd_torch(torch.from_numpy(a), 5, 10, 4, 0, method)
    _, s_ref, vt_ref = _randomized_svd(a, 5)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-8)
    assert subspace_error(vt.numpy().T, vt_ref.T) < 1e-6
    np.testing.assert_allclose((u * s) @ vt, (u.numpy() * s.numpy()) @ vt.numpy())
    idx = np.abs(vt.numpy()).argmax(axis=1)
    assert (vt.numpy()[np.arange(5), idx] > 0).all()
