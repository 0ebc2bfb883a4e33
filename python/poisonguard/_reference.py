"""Plain float64 numpy references for every kernel (same name as the op, leading underscore).

They are slow and memory-hungry on purpose: the simplest correct computation, used by the tests and benchmarks.
"""

from __future__ import annotations

import numpy as np


def _to_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (bfloat16 included)
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _covariance(x, groups, n_groups: int, ddof: int = 1):
    """Two-pass per-group statistics: ``(count [G], mean [G, d], cov [G, d, d])``; NaN for too-small groups."""
    x = _to_float64(x)
    n, d = x.shape
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(_to_float64(groups), dtype=np.int64)
    count = np.bincount(groups, minlength=n_groups).astype(np.int64)
    mean = np.full((n_groups, d), np.nan)
    cov = np.full((n_groups, d, d), np.nan)
    for g in range(n_groups):
        xg = x[groups == g]
        if len(xg):
            mean[g] = xg.mean(axis=0)
        if len(xg) > ddof:
            xc = xg - mean[g]
            cov[g] = xc.T @ xc / (len(xg) - ddof)
    return count, mean, cov


def _naive_covariance(x, ddof: int = 1) -> np.ndarray:
    """The one-pass textbook formula ``(Σxxᵀ − n μμᵀ)/(n − ddof)`` in the input precision: what not to do."""
    x = np.asarray(x)
    n = x.shape[0]
    s = x.sum(axis=0, dtype=x.dtype)
    mu = s / n
    return (x.T @ x - n * np.outer(mu, mu).astype(x.dtype)) / (n - ddof)


def _project_scores(x, groups, means, directions, que=None):
    """float64: ``p = (x − means[g]) @ directions[g]``, ``|p|²`` and ``p que[g] pᵀ`` per row."""
    x = _to_float64(x)
    n = x.shape[0]
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    means = np.asarray(means, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    proj = np.einsum("nd,ndk->nk", x - means[groups], directions[groups])
    score = (proj**2).sum(axis=1)
    qs = None if que is None else np.einsum("nk,nkl,nl->n", proj, np.asarray(que, dtype=np.float64)[groups], proj)
    return proj, score, qs


def _segmented_power_pass(x, groups, shift, q):
    """float64 reference of ``ops.segmented_power_pass`` from zero state: ``(z [G, d, l], sums [G, d], counts [G])``."""
    x = _to_float64(x)
    shift = np.asarray(shift, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    g_count = shift.shape[0]
    groups = np.zeros(x.shape[0], dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    z = np.zeros(q.shape)
    sums = np.zeros(shift.shape)
    counts = np.zeros(g_count, dtype=np.int64)
    for g in range(g_count):
        u = x[groups == g] - shift[g]
        z[g] = u.T @ (u @ q[g])
        sums[g] = u.sum(axis=0)
        counts[g] = u.shape[0]
    return z, sums, counts


def _gram(a) -> np.ndarray:
    a = _to_float64(a)
    return a.T @ a


def _randomized_svd(a, k: int):
    """Exact top-k SVD in float64: ``(U [m, k], S [k], Vt [k, n])``."""
    a = _to_float64(a)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u[:, :k], s[:k], vt[:k]


def _top_eigh(c, k: int):
    """Exact k largest eigenpairs in float64: ``(w [k] descending, V [d, k])``."""
    c = _to_float64(c)
    w, v = np.linalg.eigh(c)
    return w[::-1][:k], v[:, ::-1][:, :k]


def _power_pass(a, q) -> np.ndarray:
    a = _to_float64(a)
    return a.T @ (a @ np.asarray(q, dtype=np.float64))


def subspace_error(v_est: np.ndarray, v_ref: np.ndarray) -> float:
    """Sine of the largest principal angle between the column spaces of two [n, k] bases (0 = identical)."""
    qa, _ = np.linalg.qr(np.asarray(v_est, dtype=np.float64))
    qb, _ = np.linalg.qr(np.asarray(v_ref, dtype=np.float64))
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - float(s.min()) ** 2)))


# -- trimmed cross-entropy (ops/trim.py, torch/trim.py) ----------------------------------------------------------


def _trimmed_cross_entropy(logits, target, trim: float, ignore_index: int = -100, reduction: str = "mean"):
    """float64: ``(value, grad [logits' shape], keep [target's shape])`` of the trimmed cross-entropy.

    Rows: samples of ``[B, C]`` logits or positions of ``[B, C, d1, ...]``. Rows with ``target == ignore_index`` are
    excluded; of the ``n_valid`` others the ``k = ceil((1 − trim) · n_valid)`` with the smallest loss are kept, equal
    losses keeping the lower row index (a stable sort). ``value``: mean (0 with no valid row), sum, or per-row
    losses with dropped rows 0 (``"none"``); ``grad`` is d(sum of value · 1)/d logits, i.e. the gradient for a
    unit upstream gradient (all ones for ``"none"``).
    """
    import math

    x = _to_float64(logits)
    t = np.asarray(_to_float64(target), dtype=np.int64)
    b, c = x.shape[:2]
    npos = int(np.prod(x.shape[2:], dtype=np.int64))
    xr = np.moveaxis(x.reshape(b, c, npos), 1, 2).reshape(-1, c)  # [n, C], rows in (b, position) order
    tr = t.reshape(-1)
    n = xr.shape[0]
    valid = tr != ignore_index
    n_valid = int(valid.sum())
    drop_f = trim * n_valid
    drop = round(drop_f) if abs(drop_f - round(drop_f)) <= 1e-9 * max(1.0, drop_f) else math.floor(drop_f)
    k = n_valid - min(drop, max(n_valid - 1, 0))
    m = xr.max(axis=1, keepdims=True) if c else np.zeros((n, 1))
    lse = (m + np.log(np.exp(xr - m).sum(axis=1, keepdims=True)))[:, 0]
    safe_t = np.where(valid, tr, 0)
    loss = np.where(valid, lse - xr[np.arange(n), safe_t], 0.0)
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(loss[idx], kind="stable")]
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    p = np.exp(xr - lse[:, None])
    p[np.arange(n), safe_t] -= 1.0
    p[~keep] = 0.0
    if reduction == "mean":
        value = loss[keep].sum() / k if k else 0.0
        p = p / k if k else p
    elif reduction == "sum":
        value = loss[keep].sum()
    else:
        value = np.where(keep, loss, 0.0).reshape(t.shape)
    grad = np.moveaxis(p.reshape(b, npos, c), 2, 1).reshape(x.shape)
    return value, grad, keep.reshape(t.shape)
