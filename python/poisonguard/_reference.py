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


# -- activation clustering: the four cluster rules of ART's ClusteringAnalyzer (1.20), and the silhouette -------------
# Each takes the cluster ids of one class's samples and returns the per-sample poison flags (True = poison).


def _cluster_smaller(clusters) -> np.ndarray:
    """The least populated cluster (lowest id on ties) is poison."""
    clusters = np.asarray(clusters, dtype=np.int64)
    sizes = [int(np.sum(clusters == j)) for j in range(int(clusters.max()) + 1)]
    smallest = sizes.index(min(sizes))
    return clusters == smallest


def _cluster_relative_size(clusters, size_threshold: float = 0.35) -> np.ndarray:
    """Clusters whose share of the class, rounded to 2 decimals, is below ``size_threshold`` (rounded the same)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    flags = np.zeros(len(clusters), dtype=bool)
    for j in range(int(clusters.max()) + 1):
        share = round(float(np.sum(clusters == j)) / len(clusters), 2)
        if share < round(size_threshold, 2):
            flags |= clusters == j
    return flags


def _silhouette(x, labels) -> float:
    """Mean silhouette coefficient over all samples, every pairwise distance (O(n²)): a sample alone in its
    cluster scores 0."""
    x = _to_float64(x)
    labels = np.asarray(labels)
    n = len(x)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
    ids = np.unique(labels)
    s = np.zeros(n)
    for i in range(n):
        own = labels == labels[i]
        if own.sum() <= 1:
            continue
        a = dist[i, own].sum() / (own.sum() - 1)
        b = min(dist[i, labels == j].mean() for j in ids if j != labels[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def _cluster_silhouette(clusters, reduced, size_threshold: float = 0.35, silhouette_threshold: float = 0.1):
    """The relative-size flags, kept only when the class's mean silhouette (4 decimals) exceeds the threshold."""
    flags = _cluster_relative_size(clusters, size_threshold)
    if not round(_silhouette(reduced, clusters), 4) > round(silhouette_threshold, 4):
        flags[:] = False
    return flags


def _cluster_distance(clusters_by_class, reduced_by_class) -> list:
    """Two clusters per class; centres are coordinate-wise medians. Cluster j of class c is poison when for some
    other class k its median is nearer k's median than c's, while the other cluster's median is farther from k's
    than from c's."""
    centres = [np.median(_to_float64(r), axis=0) for r in reduced_by_class]
    out = []
    for c, (clusters, red) in enumerate(zip(clusters_by_class, reduced_by_class)):
        clusters = np.asarray(clusters)
        red = _to_float64(red)
        med = [np.median(red[clusters == j], axis=0) for j in (0, 1)]
        own = [np.linalg.norm(m - centres[c]) for m in med]
        poison = [False, False]
        for k, centre in enumerate(centres):
            if k == c:
                continue
            other = [np.linalg.norm(m - centre) for m in med]
            if other[0] < own[0] and other[1] > own[1]:
                poison[0] = True
            if other[1] < own[1] and other[0] > own[0]:
                poison[1] = True
        out.append(np.array([poison[j] for j in clusters], dtype=bool))
    return out


# -- density clustering (poisonguard.cluster) ----------------------------------------------------------------------
def _connected_components(n: int, edges) -> np.ndarray:
    """Components of the graph on ``n`` nodes with edges ``[e, 2]``, numbered by their smallest node (scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    first = np.full(lab.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, lab, np.arange(n))
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[lab]


def _border_labels(n: int, neighbours: list, core_label) -> np.ndarray:
    """For row ``r`` with neighbour list ``neighbours[r]`` (indices into ``core_label``): the smallest
    ``core_label >= 0`` among them, else -1."""
    core_label = np.asarray(core_label)
    out = np.full(n, -1, dtype=np.int64)
    for r in range(n):
        c = core_label[np.asarray(neighbours[r], dtype=np.int64)] if len(neighbours[r]) else np.zeros(0, np.int64)
        c = c[c >= 0]
        if len(c):
            out[r] = c.min()
    return out


def _dbscan(x, eps: float, min_samples: int, metric: str = "l2") -> tuple:
    """DBSCAN in float64 by brute force: ``(labels [n], core [n])``. Core: at least ``min_samples`` rows (itself
    included) within ``eps``; clusters: components of core rows within ``eps`` numbered by smallest core member; a
    border row takes the smallest cluster number among its core neighbours."""
    from scipy.spatial.distance import cdist

    x = _to_float64(x)
    n = len(x)
    dist = cdist(x, x, "cosine" if metric == "cosine" else "euclidean")
    near = dist <= eps
    core = near.sum(1) >= min_samples
    ci = np.flatnonzero(core)
    sub = near[np.ix_(ci, ci)]
    a, b = np.nonzero(sub)
    comp = _connected_components(len(ci), np.stack([a, b], 1))
    core_label = np.full(n, -1, dtype=np.int64)
    core_label[ci] = comp
    labels = core_label.copy()
    for r in np.flatnonzero(~core):
        c = core_label[near[r]]
        c = c[c >= 0]
        if len(c):
            labels[r] = c.min()
    return labels, core


# ---------------------------------------------------------------------------------------------------------------------
# Per-sample gradient norms (gradnorm): materialise every per-sample gradient in float64.


def _linear_grad_sqnorms(a, g):
    """``(‖g_bᵀ a_b‖_F² [B], ‖Σ_t g_bt‖² [B])`` in float64 for a [B, T, d_in] (or [B, d_in]) and g [B, T, d_out]."""
    a, g = _to_float64(a), _to_float64(g)
    if a.ndim == 2:
        a, g = a[:, None, :], g[:, None, :]
    m = np.einsum("bto,bti->boi", g, a)
    return (m**2).sum(axis=(1, 2)), (g.sum(axis=1) ** 2).sum(axis=1)
