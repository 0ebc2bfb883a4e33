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
    order: np.ndarray  # [N] samples sorted by class (stable); class c is order[bounds[c]:bounds[c + 1]]
    bounds: np.ndarray  # [G + 1]
    class_sorted: bool  # proj row i holds sample order[i] (disk-backed: each class is one contiguous block)

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
) -> Projected:
    """Pass 1: streaming per-class covariance. Between: the top-``k`` directions of each class (``top_eigh``). Pass 2:
    the fused centre-project kernel, projections stored ``[N, k]`` in the compute type (in a temporary file when
    larger than 256 MB). With ``clamp``, ``k`` is capped at the number of features instead of rejected."""
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

    order = np.argsort(y, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    proj = None
    class_sorted = False
    dest = None
    centre = np.nan_to_num(means)
    bar = Progress(n, progress, "pass 2/2 projections", unit="row")
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
    return Projected(y, g, counts, means, directions, eigenvalues, k_c, proj, order, bounds, class_sorted)


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
