"""What every detector shares: input plumbing, per-class flagging rules, the report."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .._interop import as_index_array, host_matrix, is_torch_tensor

# A chunk's rows are capped so that it holds at most this many bytes in float32.
_MAX_CHUNK_BYTES = 256 * 2**20


def iter_chunks(source: Any, chunk_rows: int) -> tuple[int, int, Any]:
    """``(n_rows, n_features, make_iterator)`` for any source ``poisonguard.sources`` accepts; each call of
    ``make_iterator()`` starts a new pass yielding ``(x [n, d], row_offset)``."""
    from .. import sources

    if hasattr(sources, "as_source"):
        src = sources.as_source(source, chunk_rows=chunk_rows)
        cap = max(1, _MAX_CHUNK_BYTES // max(1, 4 * src.n_features))
        if chunk_rows > cap:  # wide rows: fewer per chunk, so a chunk stays near 256 MB in the compute type
            src = sources.as_source(source, chunk_rows=cap)
        return src.n_rows, src.n_features, src.chunks
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        source = sources.open_npy(source)
    arr = source
    if not is_torch_tensor(arr):
        host_matrix(arr, "activations")  # validates type, dtype and ndim

    def passes() -> Iterator[tuple[Any, int]]:
        return sources.iter_row_chunks(arr, chunk_rows)

    return arr.shape[0], arr.shape[1], passes


def read_labels(labels: Any, n_rows: int) -> np.ndarray:
    """Class ids ``[n]`` int64 from an array, a tensor or a ``.npy`` path."""
    from .. import sources

    if hasattr(sources, "load_labels"):
        return sources.load_labels(labels, n_rows)
    if isinstance(labels, (str, bytes)) or hasattr(labels, "__fspath__"):
        labels = np.load(labels, allow_pickle=False)
    if hasattr(labels, "__len__") and len(labels) != n_rows:
        raise ValueError(f"labels has {len(labels)} entries but the source has {n_rows} rows")
    arr = as_index_array(labels, n_rows, np.iinfo(np.int64).max, name="labels")
    if (arr < 0).any():
        raise ValueError("labels must be non-negative class ids")
    return arr


def flag_top_fraction(scores: np.ndarray, labels: np.ndarray, n_classes: int, fraction: float) -> tuple:
    """Per class, flags the ``floor(fraction · n_c)`` highest scores (ties broken by index, deterministic).

    Returns ``(is_poison [n] bool, threshold [G] float64 (lowest flagged score; +inf when none))``.
    """
    order = np.lexsort((np.arange(len(scores)), -scores, labels))  # by class, score descending, then index
    counts = np.bincount(labels, minlength=n_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_flag = np.floor(fraction * counts + 1e-9).astype(np.int64)
    rank = np.arange(len(scores)) - np.repeat(starts, counts)
    flagged_sorted = rank < np.repeat(n_flag, counts)
    is_poison = np.zeros(len(scores), dtype=bool)
    is_poison[order[flagged_sorted]] = True
    threshold = np.full(n_classes, np.inf)
    last = starts + n_flag - 1
    has = n_flag > 0
    threshold[has] = scores[order[last[has]]]
    return is_poison, threshold


# Order statistics per class that the two-Gaussian fit uses.
_EM_POINTS = 500


def _order_statistics(v: np.ndarray, m: int) -> np.ndarray:
    """At most ``m`` evenly spaced order statistics of ``v`` (all of ``v``, sorted, when it is shorter), float64."""
    v = np.sort(np.asarray(v, dtype=np.float64))
    return v if len(v) <= m else v[np.linspace(0, len(v) - 1, m).astype(np.int64)]


def _two_gaussians_batch(values: list, iters: int = 100, max_points: int = _EM_POINTS) -> tuple:
    """EM for 1-D mixtures of two Gaussians, one per sample in ``values``, all at once (one EM over a padded
    ``[m, max_points]`` block, each row stopping on its own tolerance). Deterministic start at the quartiles; each
    fit uses at most ``max_points`` evenly spaced order statistics of its sample (a 1-D density needs no more).
    Returns ``(weights [m, 2], means [m, 2], sds [m, 2])``."""
    m = len(values)
    width = max([min(len(v), max_points) for v in values], default=1)
    x = np.zeros((m, width))
    live = np.zeros((m, width))  # 1 for real points, 0 for padding
    for i, v in enumerate(values):
        v = _order_statistics(v, max_points)
        x[i, : len(v)] = v
        live[i, : len(v)] = 1.0
    q = [np.percentile(x[i, : int(live[i].sum())], [25, 75]) for i in range(m)]
    mu0 = np.array([a for a, _ in q], dtype=np.float64)
    mu1 = np.array([b for _, b in q], dtype=np.float64)
    cnt = live.sum(axis=1)
    mean = (x * live).sum(axis=1) / cnt
    spread = np.sqrt(((x - mean[:, None]) ** 2 * live).sum(axis=1) / cnt)
    sd0 = np.maximum(spread / 2, 1e-12)
    sd1 = sd0.copy()
    w0 = np.full(m, 0.5)
    floor = np.maximum(spread * 1e-3, 1e-12)
    active = np.ones(m, dtype=bool)
    for _ in range(iters):
        a = np.flatnonzero(active)
        if not len(a):
            break
        xa, la = x[a], live[a]
        t = (np.log(w0[a] / (1 - w0[a])) - np.log(sd0[a] / sd1[a]))[:, None] - 0.5 * (
            ((xa - mu0[a, None]) / sd0[a, None]) ** 2 - ((xa - mu1[a, None]) / sd1[a, None]) ** 2
        )
        np.clip(t, -700, 700, out=t)
        r1 = la / (1.0 + np.exp(t))  # posterior of component 1 (0 on padding)
        r0 = la - r1
        n0, n1 = r0.sum(axis=1) + 1e-12, r1.sum(axis=1) + 1e-12
        new0, new1 = (r0 * xa).sum(axis=1) / n0, (r1 * xa).sum(axis=1) / n1
        sd0[a] = np.maximum(np.sqrt((r0 * (xa - new0[:, None]) ** 2).sum(axis=1) / n0), floor[a])
        sd1[a] = np.maximum(np.sqrt((r1 * (xa - new1[:, None]) ** 2).sum(axis=1) / n1), floor[a])
        w0[a] = np.clip(n0 / (n0 + n1), 1e-9, 1 - 1e-9)
        done = np.abs(new0 - mu0[a]) + np.abs(new1 - mu1[a]) <= 1e-5 * (spread[a] + 1e-300)
        mu0[a], mu1[a] = new0, new1
        active[a[done]] = False
    return np.stack([w0, 1 - w0], axis=1), np.stack([mu0, mu1], axis=1), np.stack([sd0, sd1], axis=1)


def mixture_flags(values: np.ndarray, labels: np.ndarray, n_classes: int, d_min: float, side: str) -> tuple:
    """Per class, a two-component Gaussian fit of ``values``; when the components are separated (Ashman's
    D = √2·|μ₁ − μ₂| / √(σ₁² + σ₂²) ≥ ``d_min``), the samples more likely under the suspicious component are flagged:
    the smaller one (``side="minor"``) or the one with the larger mean, provided it is the smaller (``"upper"``).

    Returns ``(is_poison [n] bool, scores [n] float64 = log-likelihood ratio suspicious vs other,
    separation [G] = D, share [G] = suspicious component's weight)``.
    """
    is_poison = np.zeros(len(values), dtype=bool)
    scores = np.zeros(len(values))
    separation = np.zeros(n_classes)
    share = np.zeros(n_classes)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_classes)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    fit, thinned = [], []
    for c in np.flatnonzero(counts >= 8):
        v = values[order[bounds[c] : bounds[c + 1]]]
        if np.ptp(v) > 0:
            fit.append(int(c))
            thinned.append(_order_statistics(v, _EM_POINTS))  # only these stay in memory for the fit
    ws, mus, sds = _two_gaussians_batch(thinned, max_points=_EM_POINTS)  # all classes in one EM
    for c, w, mu, sd in zip(fit, ws, mus, sds):
        idx = order[bounds[c] : bounds[c + 1]]
        v = values[idx].astype(np.float64)
        bad = int(np.argmin(w)) if side == "minor" else int(np.argmax(mu))
        good = 1 - bad
        lb = np.log(w[bad]) - np.log(sd[bad]) - 0.5 * ((v - mu[bad]) / sd[bad]) ** 2
        lg = np.log(w[good]) - np.log(sd[good]) - 0.5 * ((v - mu[good]) / sd[good]) ** 2
        scores[idx] = lb - lg
        separation[c] = np.sqrt(2) * abs(mu[0] - mu[1]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2)
        share[c] = w[bad]
        if separation[c] >= d_min and w[bad] < 0.5:
            is_poison[idx] = scores[idx] > 0
    return is_poison, scores, separation, share


# Directions whose projections measure a flagged group's spread in the heterogeneity check.
SPREAD_DIMS = 8


def spread_gate(pr: Any, flags: np.ndarray, min_ratio: float, k: int = SPREAD_DIMS) -> np.ndarray:
    """The heterogeneity check of the "auto" rules, in place on ``flags``: per class with flags, the ratio of the
    flagged samples' spread to the others' (trace of their covariance on the class's first ``k`` projections of
    ``pr``, a ``Projected``); a class whose ratio is below ``min_ratio`` keeps no flag. Returns the ratios ``[G]``
    (NaN for classes without flags, 0 when either side has fewer than 2 samples)."""
    y, g = pr.labels, pr.n_classes
    ratios = np.full(g, np.nan)
    k = min(k, pr.directions.shape[2])
    for c in np.flatnonzero(np.bincount(y[flags], minlength=g)):
        idx, block = pr.class_block(int(c), k)
        minor = flags[idx]
        ratio = 0.0
        if minor.sum() >= 2 and (~minor).sum() >= 2:
            ratio = float(block[minor].var(axis=0).sum() / max(block[~minor].var(axis=0).sum(), 1e-300))
        ratios[c] = ratio
        if ratio < min_ratio:
            flags[idx] = False
    return ratios


def detector_report(det: Any, method: str, params: dict, per_class: dict[str, np.ndarray] | None = None) -> dict:
    """The common ``report()`` of a fitted detector: parameters, totals and one row per class (samples, flagged,
    threshold, plus any ``per_class`` columns), as plain JSON-able types."""
    if not hasattr(det, "scores_"):
        raise RuntimeError("call fit() first")
    g = len(det.counts_)
    flagged = np.bincount(det.labels_[det.is_poison_], minlength=g)
    extra = per_class or {}
    return {
        "method": method,
        "params": params,
        "n_samples": len(det.scores_),
        "n_flagged": int(det.is_poison_.sum()),
        "classes": [
            {
                "class": c,
                "samples": int(det.counts_[c]),
                "flagged": int(flagged[c]),
                **{k: int(v[c]) for k, v in extra.items()},
                "threshold": float(det.threshold_[c]) if np.isfinite(det.threshold_[c]) else None,
            }
            for c in range(g)
        ],
        "skipped_classes": det.skipped_classes_,
        "solver": getattr(det, "solver_", None),
        "seconds": det.seconds_,
    }
