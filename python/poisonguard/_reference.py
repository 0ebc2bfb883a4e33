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


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample gradient norms (gradnorm): materialise every per-sample gradient in float64.


def _linear_grad_sqnorms(a, g):
    """``(‖g_bᵀ a_b‖_F² [B], ‖Σ_t g_bt‖² [B])`` in float64 for a [B, T, d_in] (or [B, d_in]) and g [B, T, d_out]."""
    a, g = _to_float64(a), _to_float64(g)
    if a.ndim == 2:
        a, g = a[:, None, :], g[:, None, :]
    m = np.einsum("bto,bti->boi", g, a)
    return (m**2).sum(axis=(1, 2)), (g.sum(axis=1) ** 2).sum(axis=1)
