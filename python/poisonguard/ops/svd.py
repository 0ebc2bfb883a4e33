"""Top-k singular value / eigen decompositions: exact Gram + ``eigh`` when cheap, randomized subspace iteration
(Halko, Martinsson & Tropp 2011) otherwise. Every pass over the data is one C++ call that reads it once."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .._interop import compute_dtype, host_matrix, is_cuda_tensor, is_torch_tensor
from .covariance import _as_int

_METHODS = ("auto", "gram", "randomized")
# Time of one multiply-add in a skinny [rows x n] @ [n x l] product relative to one in a large SYRK on this class
# of machine (measured with bench/bench_svd.py; it only moves the crossover between the two routes).
_SKINNY_PENALTY = 1.3
# The Gram route keeps an n x n float64 matrix; beyond this n the randomized route is always taken.
_GRAM_MAX_N = 8192


def svd_method(m: int, n: int, k: int, n_oversamples: int = 10, n_iter: int = 4) -> str:
    """Which route ``randomized_svd(method="auto")`` takes for an ``[m, n]`` matrix: ``"gram"`` or ``"randomized"``.

    The Gram route (``AᵀA`` by blocked SYRK summed in float64, ``eigh``, then ``U = A V / S``) is exact and reads
    ``A`` twice; it costs about ``m·s²/2 + m·s·k`` multiply-adds with ``s = min(m, n)``. The randomized route
    costs about ``(2·n_iter + 1)·m·n·l`` with ``l = k + n_oversamples``, in skinny products that run slower per
    operation. The cheaper one wins; the Gram route is also taken whenever ``l >= s / 2`` and never when ``s > 8192``.
    """
    s = min(m, n)
    big = max(m, n)
    l = min(k + n_oversamples, s)
    if s > _GRAM_MAX_N:
        return "randomized"
    if 2 * l >= s:
        return "gram"
    gram_cost = big * s * s / 2 + big * s * k * _SKINNY_PENALTY  # SYRK, then U = A V
    rand_cost = (2 * n_iter + 1) * big * s * l * _SKINNY_PENALTY
    return "gram" if gram_cost <= rand_cost else "randomized"


def _check_finite(arr: np.ndarray, what: str) -> None:
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or Inf (or values whose products overflow)")


def _fix_signs(u: np.ndarray, v: np.ndarray) -> None:
    """In place: flip each pair (u[:, j], v[:, j]) so v's largest-magnitude entry is positive (deterministic)."""
    if v.size == 0:
        return
    idx = np.abs(v).argmax(axis=0)
    flip = v[idx, np.arange(v.shape[1])] < 0
    u[:, flip] *= -1
    v[:, flip] *= -1


def _validate_common(k: Any, n_oversamples: Any, n_iter: Any, seed: Any, method: Any) -> tuple[int, int, int, int]:
    k = _as_int(k, "k", 1)
    p = _as_int(n_oversamples, "n_oversamples", 0)
    q = _as_int(n_iter, "n_iter", 0)
    s = _as_int(seed, "seed", 0)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return k, p, q, s


def randomized_svd(
    a: Any,
    k: int,
    *,
    n_oversamples: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    method: str = "auto",
) -> tuple[Any, Any, Any]:
    """Top-``k`` singular triplets of ``a`` ``[m, n]``: ``(U [m, k], S [k] descending, Vt [k, n])``.

    ``a`` is a numpy array (memmaps included) or torch tensor of float16/bfloat16/float32/float64; it is read in
    place, in blocks of rows, in its compute type (float32 below float64). Results come in the compute type, as
    numpy arrays for numpy input and torch tensors (same device) for torch input.

    ``method="randomized"`` runs subspace iteration on ``AᵀA``: ``Q₀ = orth(Ω)``, then ``n_iter`` fused passes
    ``Q ← orth(Aᵀ(A Q))`` that each read ``A`` once, then a last pass ``Y = A Q`` whose Gram ``YᵀY`` gives the
    Rayleigh–Ritz values and vectors. ``l = k + n_oversamples`` columns, ``Ω`` Gaussian from ``seed``
    (deterministic on every platform). ``method="gram"`` is exact (to float32 rounding of the products).
    ``"auto"`` picks the cheaper route, see :func:`svd_method`. Signs are fixed so that each right singular
    vector's largest-magnitude entry is positive.
    """
    k, p, q, seed = _validate_common(k, n_oversamples, n_iter, seed, method)
    if is_cuda_tensor(a):
        return _randomized_svd_torch(a, k, p, q, seed, method)
    arr, bf16 = host_matrix(a, "a")
    m, n = arr.shape
    if k > min(m, n):
        raise ValueError(f"k={k} must be at most min(m, n) = {min(m, n)} for a of shape {arr.shape}")
    transposed = n > m
    if transposed:  # work on the tall side; a transposed view, no copy
        arr = arr.T
        m, n = n, m
    if method == "auto":
        method = svd_method(m, n, k, p, q)
    ct = compute_dtype(arr)
    if method == "gram":
        gram = _core.gram(arr, bf16)
        _check_finite(gram, "a")
        w, v = _core.eigh_top(gram, k)
        s = np.sqrt(np.clip(w, 0.0, None))
        y, _ = _core.project(arr, np.ascontiguousarray(v, dtype=ct), bf16)
        u = y
    else:
        l = min(k + p, n)
        qmat = _core.gaussian(seed, n, l)
        _core.orthonormalize(qmat)
        for _ in range(q):
            z = _core.power_pass(arr, np.ascontiguousarray(qmat, dtype=ct), bf16)
            _check_finite(z, "a")
            qmat = z
            _core.orthonormalize(qmat)
        y, yty = _core.project(arr, np.ascontiguousarray(qmat, dtype=ct), bf16)
        _check_finite(yty, "a")
        w, wv = _core.eigh_top(yty, k)
        s = np.sqrt(np.clip(w, 0.0, None))
        v = _core.matmul(qmat, wv)
        u = _core.matmul(y, wv.astype(ct))
    nz = s > 0
    u[:, nz] /= s[nz].astype(ct)
    v = v.astype(ct)
    if transposed:  # back to the caller's orientation before the conventions below
        u, v = v, u
    # Conventions on the caller's factors: U columns of exactly-zero singular values are zero (their directions
    # are arbitrary), and each right singular vector's largest-magnitude entry is positive.
    u[:, ~nz] = 0
    _fix_signs(u, v)
    s = s.astype(ct)
    vt = np.ascontiguousarray(v.T)
    if is_torch_tensor(a):
        import torch

        return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vt)
    return u, s, vt


def _randomized_svd_torch(a: Any, k: int, p: int, q: int, seed: int, method: str) -> tuple[Any, Any, Any]:
    """The same algorithm on a CUDA tensor with torch (cuBLAS) products; two reads of A per iteration."""
    import torch

    if a.ndim != 2:
        raise ValueError(f"a must be 2-D [m, n], got shape {tuple(a.shape)}")
    if not a.dtype.is_floating_point:
        raise TypeError(f"a must be a floating tensor, got {a.dtype}")
    m, n = a.shape
    if k > min(m, n):
        raise ValueError(f"k={k} must be at most min(m, n) = {min(m, n)} for a of shape {tuple(a.shape)}")
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.detach()
    transposed = n > m
    if transposed:
        x = x.T
        m, n = n, m
    if method == "auto":
        method = svd_method(m, n, k, p, q)
    if method == "gram":
        gram = (x.T.to(ct) @ x.to(ct)).double()
        w, v = torch.linalg.eigh(gram)
        w, v = w.flip(0)[:k], v.flip(1)[:, :k]
        s = w.clamp_min(0).sqrt()
        u = x.to(ct) @ v.to(ct)
    else:
        l = min(k + p, n)
        qmat = torch.from_numpy(_core.gaussian(seed, n, l)).to(a.device)
        qmat = torch.linalg.qr(qmat)[0]
        for _ in range(q):
            qc = qmat.to(ct)
            qmat = torch.linalg.qr((x.T.to(ct) @ (x.to(ct) @ qc)).double())[0]
        y = x.to(ct) @ qmat.to(ct)
        yty = (y.T @ y).double()
        w, wv = torch.linalg.eigh(yty)
        w, wv = w.flip(0)[:k], wv.flip(1)[:, :k]
        s = w.clamp_min(0).sqrt()
        v = qmat @ wv
        u = y @ wv.to(ct)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    u = u / s_safe.to(ct)
    v = v.to(ct)
    if transposed:
        u, v = v, u
    u[:, s <= 0] = 0
    idx = v.abs().argmax(dim=0)
    flip = v[idx, torch.arange(v.shape[1], device=v.device)] < 0
    u[:, flip] *= -1
    v[:, flip] *= -1
    return u, s.to(ct), v.T.contiguous()


def top_eigh(
    c: Any,
    k: int,
    *,
    method: str = "auto",
    n_oversamples: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of a symmetric ``[d, d]`` matrix: ``(w [k] descending, V [d, k])`` float64.

    ``method="gram"`` (exact; LAPACK ``dsyevr`` for the top ``k`` only), ``"randomized"`` (subspace iteration
    with ``C²``: ``n_iter`` passes, then Rayleigh–Ritz; it finds the largest-*magnitude* eigenvalues, which are the
    largest ones for positive semi-definite matrices such as covariances), or ``"auto"``: exact when ``d <= 1024``
    or ``4·(k + n_oversamples) > d``, randomized otherwise. ``c`` may be numpy or a CPU torch tensor; the exact
    route works on a float64 C-contiguous copy when ``c`` is not one already.
    """
    k, p, q, seed = _validate_common(k, n_oversamples, n_iter, seed, method)
    if is_torch_tensor(c):
        import torch

        c = c.detach().cpu()
        if c.dtype == torch.bfloat16:
            c = c.float()  # numpy has no bfloat16: a float32 copy of the d x d matrix
    arr, _ = host_matrix(c, "c")
    d = arr.shape[0]
    if arr.shape[1] != d:
        raise ValueError(f"c must be square [d, d], got shape {arr.shape}")
    if k > d:
        raise ValueError(f"k={k} must be at most d = {d}")
    dense = arr
    scale = float(np.abs(dense).max()) if d else 0.0
    if not np.isfinite(scale):
        raise ValueError("c contains NaN or Inf")
    if d and np.abs(dense - dense.T).max() > 1e-5 * scale + np.finfo(np.float64).tiny:
        raise ValueError("c must be symmetric; |c - c.T| exceeds 1e-5 of max|c|")
    l = min(k + p, d)
    if method == "auto":
        method = "gram" if d <= 1024 or 4 * l > d else "randomized"
    if method == "gram":
        w, v = _core.eigh_top(np.ascontiguousarray(dense, dtype=np.float64), k)
        return w, v
    ct = compute_dtype(arr)
    qmat = _core.gaussian(seed, d, l)
    _core.orthonormalize(qmat)
    for _ in range(q):
        qmat = _core.power_pass(arr, np.ascontiguousarray(qmat, dtype=ct))
        _core.orthonormalize(qmat)
    y, _ = _core.project(arr, np.ascontiguousarray(qmat, dtype=ct))
    t = _core.matmul(np.ascontiguousarray(qmat.T), y.astype(np.float64))
    t = np.ascontiguousarray((t + t.T) / 2)
    w, wv = _core.eigh_top(t, l)
    order = np.argsort(-w, kind="stable")[:k]
    w, v = w[order], _core.matmul(qmat, np.ascontiguousarray(wv[:, order]))
    _fix_signs(np.empty((0, k)), v)
    return w, v


__all__ = ["randomized_svd", "svd_method", "top_eigh"]
