"""The two passes every projection detector shares: per-class statistics, then per-class projections."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._progress import Progress
from ..ops import StreamingCovariance, project_scores, top_eigh
from ..sources.arrays import _PageReleaser
from ._base import iter_chunks, read_labels

# Projections larger than this go to a temporary file instead of memory.
_IN_MEMORY_BYTES = 256 * 2**20


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


def project_by_class(
    source: Any, labels: Any, n_classes: int | None, k: int, chunk_rows: int, progress: bool = False
) -> Projected:
    """Pass 1: streaming per-class covariance. Between: the top-``k`` directions of each class (``top_eigh``). Pass 2:
    the fused centre-project kernel, projections stored ``[N, k]`` in the compute type (in a temporary file when
    larger than 256 MB)."""
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
    if k > d:
        raise ValueError(f"n_components={k} exceeds the number of features {d}")

    acc = StreamingCovariance(d, g)
    bar = Progress(n, progress, "pass 1/2 statistics", unit="row")
    for x, off in passes():
        acc.update(x, y[off : off + x.shape[0]])
        bar.update(x.shape[0])
    bar.close()
    counts, means = acc.count, acc.mean
    cov = acc.covariance(ddof=0)
    k_c = np.minimum(k, np.maximum(counts - 1, 0))
    directions = np.zeros((g, d, k))
    eigenvalues = np.zeros((g, k))
    for c in np.flatnonzero(k_c >= 1):
        eigenvalues[c, : k_c[c]], directions[c, :, : k_c[c]] = top_eigh(cov[c], int(k_c[c]))
    del cov

    proj = None
    centre = np.nan_to_num(means)
    bar = Progress(n, progress, "pass 2/2 projections", unit="row")
    for x, off in passes():
        p, _, _ = project_scores(x, y[off : off + x.shape[0]], centre, directions)
        p = p.numpy() if hasattr(p, "numpy") else p
        if proj is None:  # the kernels' compute type: float64 for float64 input, float32 otherwise
            proj = _allocate(n, k, p.dtype)
            pages = _PageReleaser(proj)
        proj[off : off + x.shape[0]] = p
        pages.release(proj[off : off + x.shape[0]])  # written pages leave this process (kept by the OS cache)
        bar.update(x.shape[0])
    bar.close()
    if proj is None:
        proj = np.empty((n, k), dtype=np.float32)
    return Projected(y, g, counts, means, directions, eigenvalues, k_c, proj)


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
