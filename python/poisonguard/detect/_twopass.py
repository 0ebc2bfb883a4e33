"""The two passes every projection detector shares: per-class statistics, then per-class projections."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._progress import Progress
from ..ops import StreamingCovariance, project_scores, segmented_power_pass, top_eigh
from ..sources.arrays import _PageReleaser
from ._base import iter_chunks, read_labels

_log = logging.getLogger("poisonguard")

# Projections larger than this go to a temporary file instead of memory.
_IN_MEMORY_BYTES = 256 * 2**20
# Default memory budget of the per-class statistics (the covariance route needs about 20 bytes per G·d² entry).
DEFAULT_MEMORY_BUDGET = 2 * 2**30
_SOLVERS = ("auto", "covariance", "subspace")


@dataclass
class Projected:
    """Result of the two passes: per-class statistics and the centred projections of every row."""

    labels: np.ndarray  # [N] int64
    n_classes: int
    counts: np.ndarray  # [G] int64
    means: np.ndarray  # [G, d] float64 (NaN rows for empty classes)
    directions: np.ndarray  # [G, d, K] float64, top-K eigenvectors of each class covariance (zero columns if fewer)
    eigenvalues: np.ndarray  # [G, K]
    n_components: np.ndarray  # [G] usable directions per class
    proj: np.ndarray  # [N, K] compute type: (x - mean[class]) @ directions[class]; memory or a temporary memmap
    order: np.ndarray  # [N] samples sorted by class (stable); class c is order[bounds[c]:bounds[c + 1]]
    bounds: np.ndarray  # [G + 1]
    class_sorted: bool  # proj row i holds sample order[i] (disk-backed: each class is one contiguous block)
    solver: str = "covariance"  # how the directions were found: "covariance" or "subspace"
    passes: int = 2  # reads of the source in total
    residual: float = 0.0  # subspace route: largest relative Ritz residual of the directions kept (0 = exact)

    def solver_info(self) -> dict:
        """How the directions were found, for reports."""
        return {"solver": self.solver, "passes": int(self.passes), "residual": float(self.residual)}

    def columns(self, k: int) -> np.ndarray:
        """The first ``k`` projections of every sample, ``[N, k]`` float64, in sample order."""
        out = read_columns(self.proj, k)
        if not self.class_sorted:
            return out
        res = np.empty_like(out)
        res[self.order] = out
        return res

    def class_block(self, c: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sample indices [n_c], their first k projections [n_c, k] float64)`` for class ``c``."""
        b0, b1 = int(self.bounds[c]), int(self.bounds[c + 1])
        idx = self.order[b0:b1]
        if self.class_sorted:
            block = np.asarray(self.proj[b0:b1, :k], dtype=np.float64)
            if isinstance(self.proj, np.memmap):
                _PageReleaser(self.proj).release(self.proj[b0:b1])
            return idx, block
        return idx, read_columns(self.proj, k, idx)


def project_by_class(
    source: Any,
    labels: Any,
    n_classes: int | None,
    k: int,
    chunk_rows: int,
    progress: bool = False,
    clamp: bool = False,
    solver: str = "auto",
    memory_budget: int | None = None,
    seed: int = 0,
) -> Projected:
    """The per-class top-``k`` directions, then the fused centre-project pass; projections stored ``[N, k]`` in the
    compute type (in a temporary file when larger than 256 MB). With ``clamp``, ``k`` is capped at the number of
    features instead of rejected.

    ``solver="covariance"``: one pass of streaming per-class covariance, then ``top_eigh`` per class (exact; memory
    about ``20·G·d²`` bytes). ``solver="subspace"``: streamed class-segmented subspace iteration, one fused
    ``Uᵀ(U Q)`` pass per iteration until the variance the top-``k`` Ritz vectors capture settles (relative change
    ≤ 1e-3) or their residuals fall below 1e-3 (at most 6 passes; memory ``O(G·d·(k + 10))``).
    ``"auto"`` takes the covariance route when it fits ``memory_budget`` bytes (default 2 GiB).
    """
    check_solver(solver, memory_budget)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    n, d, passes = iter_chunks(source, chunk_rows)
    y = read_labels(labels, n)
    if n_classes is None:
        g = int(y.max()) + 1 if n else 1
    else:
        g = int(n_classes)
        if g < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if n and y.max() >= g:
        raise ValueError(f"labels go up to {int(y.max())} but n_classes={g}")
    if clamp:
        k = min(k, d)
    elif k > d:
        raise ValueError(f"n_components={k} exceeds the number of features {d}")

    if solver == "auto":
        solver = "covariance" if covariance_bytes(g, d) <= budget else "subspace"
    residual = 0.0
    if solver == "covariance":
        counts, means, directions, eigenvalues, k_c = _covariance_directions(passes, y, n, g, d, k, progress)
        n_passes = 2
    else:
        counts, means, directions, eigenvalues, k_c, n_passes, residual = _subspace_directions(
            passes, y, n, g, d, k, progress, seed
        )
        n_passes += 1

    order = np.argsort(y, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    proj = None
    class_sorted = False
    dest = None
    centre = np.nan_to_num(means)
    bar = Progress(n, progress, f"pass {n_passes}/{n_passes} projections", unit="row")
    for x, off in passes():
        m = x.shape[0]
        p, _, _ = project_scores(x, y[off : off + m], centre, directions)
        p = p.numpy() if hasattr(p, "numpy") else p
        if proj is None:  # the kernels' compute type: float64 for float64 input, float32 otherwise
            proj = _allocate(n, k, p.dtype)
            class_sorted = isinstance(proj, np.memmap)
            if class_sorted:
                # On disk, rows go to their class's block, so that the per-class stage reads each class as one
                # contiguous run instead of pages scattered over the whole file.
                dest = np.empty(n, dtype=np.int64)
                dest[order] = np.arange(n)
                pages = _PageReleaser(proj)
        if class_sorted:
            proj[dest[off : off + m]] = p
            pages.release(proj[:])  # written pages leave this process (the OS cache keeps them)
        else:
            proj[off : off + m] = p
        bar.update(m)
    bar.close()
    del dest
    if proj is None:
        proj = np.empty((n, k), dtype=np.float32)
    return Projected(
        y, g, counts, means, directions, eigenvalues, k_c, proj, order, bounds, class_sorted, solver, n_passes, residual
    )


def check_solver(solver: str, memory_budget: int | None) -> tuple[str, int | None]:
    """Validates the ``solver`` / ``memory_budget`` pair every projection detector takes; returns it."""
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if memory_budget is not None and not int(memory_budget) > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    return solver, memory_budget


def covariance_bytes(n_classes: int, d: int) -> int:
    """Memory of the covariance route's per-class state: fp64 moments, fp32 staging, the fp64 covariances."""
    return 20 * int(n_classes) * int(d) ** 2


def _covariance_directions(passes, y, n, g, d, k, progress):
    acc = StreamingCovariance(d, g)
    bar = Progress(n, progress, "pass 1/2 statistics", unit="row")
    for x, off in passes():
        acc.update(x, y[off : off + x.shape[0]])
        bar.update(x.shape[0])
    bar.close()
    counts, means = acc.count, acc.mean
    cov = acc.covariance(ddof=0)
    del acc
    k_c = np.minimum(k, np.maximum(counts - 1, 0))
    directions = np.zeros((g, d, k))
    eigenvalues = np.zeros((g, k))
    for c in np.flatnonzero(k_c >= 1):
        eigenvalues[c, : k_c[c]], directions[c, :, : k_c[c]] = top_eigh(cov[c], int(k_c[c]))
    return counts, means, directions, eigenvalues, k_c


# Subspace iteration: oversampling of the block, stopping tolerances on the relative Ritz residual and on the
# relative change of the Ritz values between passes, pass limit.
_OVERSAMPLE = 10
_SUBSPACE_TOL = 1e-3
_SUBSPACE_VALUE_TOL = 1e-3
_SUBSPACE_MAX_PASSES = 6


def _subspace_directions(passes, y, n, g, d, k, progress, seed):
    """Top-``k`` eigenpairs of every class covariance without forming it: block subspace iteration, one streamed
    class-segmented pass ``Z_c = C_c Q_c`` per iteration (rows shifted by the class mean, the first pass by the
    class's first-chunk mean and corrected exactly), Rayleigh–Ritz on ``[Q_c, Z_c]`` after each pass, stop when every
    class's top-``k`` relative residual ``‖C v − λ v‖ / λ₁`` is below the tolerance, or the variance captured by
    every class's top-``k`` Ritz vectors (the sum of their Ritz values) changed by less than 1e-3 relative: where
    the spectrum is flat (a noise bulk) single directions are not defined and any basis of it captures the same
    variance. Memory ``O(G·d·l)``."""
    l = min(d, k + _OVERSAMPLE)
    shift = np.zeros((g, d))
    have_shift = np.zeros(g, dtype=bool)
    counts = np.zeros(g, dtype=np.int64)
    means = np.full((g, d), np.nan)
    w_all = np.zeros((g, l))
    u_all = np.zeros((g, l, l))
    z = np.empty((g, d, l))  # the starting basis, then each pass's accumulator, then the next basis
    for c in range(g):
        z[c] = _core.gaussian(seed * 1_000_003 + c, d, l)
    _orthonormalize(z)
    qc = None
    residual = np.inf
    n_pass = 0
    while n_pass < _SUBSPACE_MAX_PASSES:
        n_pass += 1
        sums = np.zeros((g, d))
        counts = np.zeros(g, dtype=np.int64)
        bar = Progress(n, progress, f"pass {n_pass} subspace iteration", unit="row")
        for x, off in passes():
            m = x.shape[0]
            yy = y[off : off + m]
            if qc is None:  # the basis in the kernels' compute type
                qc = z.astype(np.float64 if np.dtype(x.dtype) == np.float64 else np.float32)
                z[:] = 0.0
            new = np.unique(yy[~have_shift[yy]])
            for c in new:  # a class's first rows: shift by their mean (cancellation stays small in fp32)
                shift[c] = np.asarray(x[yy == c], dtype=np.float64).mean(axis=0)
                have_shift[c] = True
            segmented_power_pass(x, yy, shift, qc, z, sums, counts)
            bar.update(m)
        bar.close()
        if qc is None:  # empty source
            break
        w_prev = w_all.copy()
        residual, moved = 0.0, 0.0
        # Between passes, per class, O(d·l²): through the package's single-threaded small products (a BLAS pool
        # woken for each of these small calls costs more than the products on a busy machine).
        for c in np.flatnonzero(counts):
            nc = float(counts[c])
            qf = np.ascontiguousarray(qc[c], dtype=np.float64)
            delta = sums[c] / nc  # class mean − shift
            # C_c Q_c for the ddof=0 covariance: the shifted sums corrected by the mean's offset from the shift.
            zc = z[c]
            zc -= nc * np.outer(delta, _core.matmul(delta[None, :], qf)[0])
            zc /= nc
            means[c] = shift[c] + delta
            bmat = _core.matmul(np.ascontiguousarray(qf.T), zc)
            w, u = _core.eigh_top(np.ascontiguousarray((bmat + bmat.T) / 2), l)
            w_all[c], u_all[c] = w, u
            zu = _core.matmul(zc, np.ascontiguousarray(u))
            kc = int(min(k, max(counts[c] - 1, 0)))
            if kc and w[0] > 0:
                r = zu[:, :kc] - _core.matmul(qf, np.ascontiguousarray(u[:, :kc])) * w[:kc]
                residual = max(residual, float(np.sqrt((r * r).sum(axis=0)).max() / w[0]))
                top = float(w[:kc].sum())
                moved = max(moved, abs(top - float(w_prev[c, :kc].sum())) / top)
            z[c] = zu  # the next basis, orthonormalised below
        shift = np.where(counts[:, None] > 0, np.nan_to_num(means), shift)
        settled = n_pass > 1 and moved <= _SUBSPACE_VALUE_TOL
        _log.debug("subspace pass %d: Ritz residual %.2e, captured variance moved %.2e", n_pass, residual, moved)
        if residual <= _SUBSPACE_TOL or settled or n_pass == _SUBSPACE_MAX_PASSES:
            break  # the directions come from this pass's basis qc and its Ritz vectors
        _orthonormalize(z)
        qc[:] = z
        z[:] = 0.0
    del z
    k_c = np.minimum(k, np.maximum(counts - 1, 0))
    directions = np.zeros((g, d, k))
    eigenvalues = np.zeros((g, k))
    if qc is not None:
        for c in np.flatnonzero(k_c >= 1):
            kc = int(k_c[c])
            directions[c, :, :kc] = qc[c].astype(np.float64) @ u_all[c][:, :kc]
            eigenvalues[c, :kc] = np.maximum(w_all[c][:kc], 0.0)
    return counts, means, directions, eigenvalues, k_c, n_pass, (0.0 if qc is None else residual)


def _orthonormalize(q: np.ndarray) -> None:
    """In place: every ``q[c]`` ``[d, l]`` (float64, C-contiguous) becomes an orthonormal basis of its columns."""
    for c in range(q.shape[0]):
        _core.orthonormalize(q[c])


def read_columns(proj: np.ndarray, k: int, rows: np.ndarray | None = None, chunk: int = 1 << 16) -> np.ndarray:
    """``proj[rows, :k]`` (all rows when None) as a dense float64 array, read in row blocks; for a disk-backed
    ``proj`` the pages read are released as it goes, so resident memory stays near the result's size."""
    pages = _PageReleaser(proj) if isinstance(proj, np.memmap) else None
    if rows is None:
        out = np.empty((proj.shape[0], k))
        for s in range(0, proj.shape[0], chunk):
            out[s : s + chunk] = proj[s : s + chunk, :k]
            if pages is not None:
                pages.release(proj[s : s + chunk])
        return out
    out = np.asarray(proj[rows, :k], dtype=np.float64)
    if pages is not None and len(proj):
        pages.release(proj[:])
    return out


def _allocate(n: int, k: int, dtype: np.dtype) -> np.ndarray:
    if n * k * np.dtype(dtype).itemsize > _IN_MEMORY_BYTES:
        fd, path = tempfile.mkstemp(prefix="poisonguard-proj-", suffix=".bin")
        os.close(fd)
        try:
            return np.memmap(path, dtype=dtype, mode="w+", shape=(n, k))
        finally:
            os.unlink(path)  # the mapping keeps the data; the space is freed when it goes
    return np.empty((n, k), dtype=dtype)
