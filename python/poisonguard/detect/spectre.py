"""SPECTRE (Hayase, Kong, Somani & Oh, ICML 2021): robust whitening and QUantum Entropy (QUE) scores over
streamed activations."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.linalg import expm

from .. import _core
from ..ops.covariance import _as_int
from ._base import detector_report, flag_top_fraction, mixture_flags
from ._twopass import Projected, check_solver, project_by_class


def _cov_and_inverse(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, covariance (ddof 0) and its pseudo-inverse, through this package's BLAS/LAPACK (small products here run
    single-threaded; numpy's threaded BLAS on 32 x 32 problems costs milliseconds a call on a busy machine)."""
    mu = p.mean(axis=0)
    xc = np.ascontiguousarray(p - mu)
    c = _core.matmul(np.ascontiguousarray(xc.T), xc) / max(len(p), 1)
    c = (c + c.T) / 2
    w, v = _core.eigh_top(np.ascontiguousarray(c), c.shape[0])
    keep = w > 1e-12 * max(float(w[0]) if len(w) else 0.0, 1e-300)
    inv = _core.matmul(np.ascontiguousarray(v[:, keep] / w[keep]), np.ascontiguousarray(v[:, keep].T))
    return mu, c, inv


def robust_mean_cov(
    p: np.ndarray, trim: float, iters: int = 20, max_rows: int = 20000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and covariance of ``p`` ``[n, k]`` after iteratively dropping the ``trim`` share of rows with the largest
    Mahalanobis distance (a concentration step, as in MCD). Classes larger than ``max_rows`` are estimated on
    ``max_rows`` evenly spaced rows (a k-dimensional mean and covariance need no more; it bounds the cost per class).
    Returns ``(mean [k], cov [k, k], kept [rows used] bool)``."""
    if len(p) > max_rows:
        p = p[np.linspace(0, len(p) - 1, max_rows).astype(np.int64)]
    n, k = p.shape
    p = np.ascontiguousarray(p, dtype=np.float64)
    n_keep = min(n, max(k + 1, int(np.ceil((1.0 - trim) * n))))
    keep = np.ones(n, dtype=bool)
    for _ in range(iters):
        mu, _, inv = _cov_and_inverse(p[keep])
        diff = p - mu
        d2 = np.einsum("ij,ij->i", _core.matmul(diff, inv), diff)
        new = np.zeros(n, dtype=bool)
        new[np.argpartition(d2, n_keep - 1)[:n_keep] if n_keep < n else slice(None)] = True
        if np.array_equal(new, keep):
            break
        keep = new
    mu, c, _ = _cov_and_inverse(p[keep])
    return mu, c, keep


def que_scores(z: np.ndarray, alpha: float) -> np.ndarray:
    """QUE scores of whitened rows ``z`` ``[n, k]``: ``τ_i = z_iᵀ Q z_i`` with ``Q = expm(α (S − I) / ‖S − I‖₂)``
    normalised to unit trace, ``S = zᵀz / n`` — the **matrix** exponential (not an element-wise one)."""
    n, k = z.shape
    z = np.ascontiguousarray(z, dtype=np.float64)
    s = _core.matmul(np.ascontiguousarray(z.T), z) / max(n, 1)
    m = s - np.eye(k)
    norm = np.linalg.norm(m, 2)
    if not np.isfinite(norm) or norm <= 1e-12:
        q = np.eye(k) / k  # already isotropic: QUE is the squared norm over k
    else:
        q = expm(alpha * m / norm)
        q /= np.trace(q)
    return np.einsum("ij,ij->i", _core.matmul(z, np.ascontiguousarray(q)), z)


class Spectre:
    """SPECTRE: per class, PCA to ``n_components`` dimensions, robust mean/covariance (iterative trimming),
    whitening with the robust covariance, QUE scores (matrix exponential, ``alpha``), flag the highest.

    Parameters
    ----------
    expected_poison_fraction : float in (0, 1] or ``"auto"``, default 0.05
        With a number: the trimmed share of the robust estimate is ``min(0.5, eps_multiplier · ε)`` and that share
        of each class's highest QUE scores is flagged (the paper's rule). With ``"auto"``: 40% trimmed, and two
        Gaussians fitted to each class's log QUE scores; when the upper mode is the smaller one and separated from
        the other (Ashman's D ≥ ``auto_separation``, default 4: log QUE of a clean class is skewed, and its
        two-Gaussian fit alone reaches D ≈ 2.5–3.3 on the digits demo's clean classes) its samples are flagged,
        else none.
    n_components : int, default 32
        PCA dimensions per class (capped at ``d`` and the class size − 1).
    alpha : float, default 4.0
        QUE's exponent scale (the paper's α).
    chunk_rows, solver, memory_budget, auto_separation
        As :class:`SpectralSignature` (``auto_separation`` default 4.0 here).

    Attributes after :meth:`fit`: as :class:`SpectralSignature` (``scores_`` are QUE scores), plus
    ``n_components_ [G]``. Two passes over the source (more on the subspace route); the ``[N, k]`` projections are
    kept in memory (float32), or in a temporary file above 256 MB.
    """

    def __init__(
        self,
        expected_poison_fraction: float | str = 0.05,
        *,
        eps_multiplier: float = 1.5,
        n_components: int = 32,
        alpha: float = 4.0,
        chunk_rows: int = 16384,
        solver: str = "auto",
        memory_budget: int | None = None,
        auto_separation: float = 4.0,
    ) -> None:
        if expected_poison_fraction != "auto" and (
            isinstance(expected_poison_fraction, str) or not 0 < float(expected_poison_fraction) <= 1
        ):
            raise ValueError(f"expected_poison_fraction must be in (0, 1] or 'auto', got {expected_poison_fraction!r}")
        if not eps_multiplier > 0:
            raise ValueError(f"eps_multiplier must be > 0, got {eps_multiplier}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not auto_separation > 0:
            raise ValueError(f"auto_separation must be > 0, got {auto_separation}")
        self.expected_poison_fraction = expected_poison_fraction
        self.eps_multiplier = float(eps_multiplier)
        self.n_components = _as_int(n_components, "n_components", 1)
        self.alpha = float(alpha)
        self.chunk_rows = _as_int(chunk_rows, "chunk_rows", 1)
        self.solver, self.memory_budget = check_solver(solver, memory_budget)
        self.auto_separation = float(auto_separation)

    def fit(self, source: Any, labels: Any, *, n_classes: int | None = None) -> Spectre:
        """Two passes over ``source`` (activations ``[N, d]``), then per-class robust statistics on the ``[n_c, k]``
        projections. Returns ``self``."""
        t0 = time.perf_counter()
        projected = project_by_class(
            source,
            labels,
            n_classes,
            self.n_components,
            self.chunk_rows,
            clamp=True,
            solver=self.solver,
            memory_budget=self.memory_budget,
        )
        self._fit_projected(projected)
        self.seconds_ = time.perf_counter() - t0
        return self

    def _fit_projected(self, pr: Projected) -> None:
        """QUE scores and flags from the shared two-pass result (its first ``n_components`` directions)."""
        y, g = pr.labels, pr.n_classes
        n = len(y)
        k_c = np.minimum(pr.n_components, self.n_components)
        auto = self.expected_poison_fraction == "auto"
        trim = 0.4 if auto else min(0.5, self.eps_multiplier * float(self.expected_poison_fraction))
        scores = np.zeros(n)
        small = k_c < 2
        for c in np.flatnonzero(~small):
            idx, pc = pr.class_block(int(c), int(k_c[c]))
            mu, sigma, _ = robust_mean_cov(pc, trim)
            w, v = _core.eigh_top(np.ascontiguousarray((sigma + sigma.T) / 2), sigma.shape[0])
            keep = w > 1e-10 * max(float(w.max()), 1e-300)
            z = _core.matmul(np.ascontiguousarray(pc - mu), np.ascontiguousarray(v[:, keep] / np.sqrt(w[keep])))
            scores[idx] = que_scores(z, self.alpha)
        counts = pr.counts
        means = pr.means
        directions = pr.directions[:, :, : self.n_components]

        if auto:
            # Two Gaussians on log τ: poison is an upper mode; a clean class is one mode (τ ~ χ²-like, whose log is
            # close to Gaussian).
            logt = np.log(np.maximum(scores, 1e-300))
            flags, _, self.separation_, self.share_ = mixture_flags(logt, y, g, self.auto_separation, "upper")
            self.is_poison_ = flags
            cut = np.full(g, np.inf)
            for c in np.flatnonzero(np.bincount(y[flags], minlength=g)):
                cut[c] = scores[flags & (y == c)].min()
            self.threshold_ = cut
        else:
            frac = min(1.0, self.eps_multiplier * float(self.expected_poison_fraction))
            self.is_poison_, self.threshold_ = flag_top_fraction(scores, y, g, frac)
        self.is_poison_[small[y]] = False
        self.threshold_[small] = np.inf
        self.scores_ = scores
        self.labels_ = y
        self.counts_ = counts
        self.means_ = means
        self.directions_ = directions
        self.n_components_ = k_c
        self.skipped_classes_ = [int(c) for c in np.flatnonzero(small & (counts > 0))]
        self.solver_ = pr.solver_info()
        self.seconds_ = 0.0

    def report(self) -> dict:
        """Per-class counts and the parameters, as plain JSON-able types."""
        return detector_report(
            self,
            "spectre",
            {
                "expected_poison_fraction": self.expected_poison_fraction,
                "eps_multiplier": self.eps_multiplier,
                "n_components": self.n_components,
                "alpha": self.alpha,
                "auto_separation": self.auto_separation,
            },
            {"n_components": self.n_components_} if hasattr(self, "n_components_") else None,
        )
