"""Out-of-core density clustering: DBSCAN approximated on k-means cells, two streaming passes, memory O(cells · d).

1. **Cells.** A FAISS k-means with ``n_cells`` centroids (default ``clamp(n // 20, 16, 4096)``) is trained on
   ``sample_rows`` evenly spaced rows (default ``min(n, max(30 n_cells, 50 000))``; rows are read directly from
   arrays and memory maps, by one extra pass from other sources). ``eps=None`` is read from the knee of the sample's
   k-distance curve (k = ``min_samples`` scaled to the sample, at least 2; radius rescaled to the full density).
2. **Pass 1** assigns each row to its ``probe = min(8, n_cells)`` nearest centroids (from 1024 cells on, found
   through an IVF index over the centroids, ``sqrt(n_cells)`` lists of which ``max(4, lists // 8)`` are probed) and
   accumulates, per cell: the
   rows it holds (nearest centroid), their sum (mean) and squared distances (RMS radius), its *density*, i.e. the
   rows within ``eps`` of the centroid (counted over every row's probed centroids), and, per pair of cells, the rows
   within ``eps`` of both centroids (*witnesses*).
3. **Weighted DBSCAN on cells.** A centroid is core when its ``eps``-ball holds ``>= min_samples`` rows (its density:
   the rows counted there are the weights). Core cells are joined when their centroids lie within ``eps`` (core
   points within ``eps``) or when a row lies within ``eps`` of both (a witness: the two balls overlap where there
   are rows); clusters are the components (the C++ union-find in ``_core``).
4. **Pass 2** labels each row with the cluster of its nearest core centroid among the probed ones that lies within
   ``reach · eps + 0.5 · r_cell`` of it (``r_cell`` = the cell's RMS radius: the cell's core rows spread around its
   centroid; default ``reach = 1``); rows with no such centroid are noise. Clusters are then renumbered by size.

This is an approximation of DBSCAN: rows are tested against centroids, not against each other. It agrees with
DBSCAN (ARI >= 0.95 measured) where DBSCAN's answer is stable, i.e. dense clusters apart by more than a few eps and
sparse noise; it departs where DBSCAN itself splits a cluster's fringe into core, border and noise rows one by one
(eps near the cluster density, high d), and it needs cells about eps wide or finer in dense regions (more cells
otherwise); ``report()["stream"]`` gives the cell statistics to check it. Labels go to a temporary memory-mapped
file (deleted when the array goes) when ``8 n`` bytes exceed a quarter of ``memory_budget``.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix

from .._progress import Progress
from ..sources.arrays import ArraySource, TensorSource, _PageReleaser
from .density import _chunk_float32, knee

_MAX_PROBE = 8
# From this many cells on, rows are assigned through an IVF index over the centroids (see _assigner).
_IVF_CELLS = 1024
# Rows within eps of both centroids that join two core cells (measured: 1 keeps clusters whole; min_samples split
# them into many pieces when cells are about eps wide).
_WITNESS_MIN = 1
# Pass 2 reach beyond reach * eps, in units of the cell's RMS radius: the cell's core rows lie around its centroid.
_RADIUS_REACH = 0.5


def default_cells(n: int) -> int:
    return int(min(4096, max(16, n // 4)))


def fit_stream(dc: Any, faiss: Any, src: Any) -> None:
    """Fits ``dc`` (a DensityClustering) out of core on the source ``src``; sets its result attributes."""
    from .. import _core

    n, d = src.n_rows, src.n_features
    ms = int(dc.min_samples)
    stages: dict[str, float] = {}
    info: dict[str, Any] = {"passes_over_source": 2}
    dc.index_ = {"kind": "kmeans cells", "exact": False}
    dc.strategy_ = "k-means cells, weighted DBSCAN on cells, two passes"
    if n == 0:
        dc.eps_ = float(dc.eps) if dc.eps is not None else float("nan")
        dc.eps_source_ = "given" if dc.eps is not None else "no rows"
        dc.stream_info_ = info
        dc._set_result(np.empty(0, np.int64), None, stages)
        return

    # -- sample and cells --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    n_cells = int(min(dc.n_cells if dc.n_cells is not None else default_cells(n), n))
    m = int(min(n, dc.sample_rows if dc.sample_rows is not None else max(30 * n_cells, 50_000)))
    n_cells = min(n_cells, m)  # k-means needs a sample row per centroid
    sample, sampled_by_pass = _sample(src, m)
    info["passes_over_source"] += int(sampled_by_pass)
    _check_finite(sample, None)
    shift = sample.mean(axis=0, dtype=np.float64).astype(np.float32) if dc.metric == "l2" else None
    sample = _prepare(sample, dc.metric, shift, 0)
    km = faiss.Kmeans(
        d,
        n_cells,
        niter=12,
        seed=int(dc.seed) + 1,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, m // n_cells),
    )
    km.train(sample)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    flat = faiss.IndexFlatL2(d)
    flat.add(centroids)
    quant = _assigner(faiss, centroids) if n_cells >= _IVF_CELLS else flat
    stages["sample_kmeans"] = time.perf_counter() - t

    if dc.eps is None:
        dc.eps_, dc.eps_source_ = _eps_from_sample(faiss, sample, n, ms, dc.metric)
    else:
        dc.eps_, dc.eps_source_ = float(dc.eps), "given"
    del sample
    r2 = np.float32(dc._radius2(dc.eps_))
    probe = min(_MAX_PROBE, n_cells)

    # -- pass 1: per-cell statistics ---------------------------------------------------------------------------------
    t = time.perf_counter()
    counts = np.zeros(n_cells, np.int64)
    dens = np.zeros(n_cells, np.int64)
    sums = np.zeros((n_cells, d), np.float64)
    sq = np.zeros(n_cells, np.float64)
    pairs = _PairCounter(n_cells)
    bar = Progress(n, dc.progress, "cluster pass 1/2 cells", unit="row")
    for x, off in src.chunks():
        xc = _prepare(_chunk_float32(x), dc.metric, shift, off)
        dist, ids = quant.search(xc, probe)
        near = ids[:, 0]
        counts += np.bincount(near, minlength=n_cells)
        sq += np.bincount(near, weights=dist[:, 0], minlength=n_cells)
        sums += csr_matrix((np.ones(len(xc)), (near, np.arange(len(xc)))), shape=(n_cells, len(xc))) @ xc
        within = dist <= r2
        dens += np.bincount(ids[within], minlength=n_cells)
        for a in range(probe):
            for b in range(a + 1, probe):
                both = within[:, a] & within[:, b]
                if both.any():
                    pairs.add(ids[both, a], ids[both, b])
        bar.update(len(xc))
    bar.close()
    stages["pass1"] = time.perf_counter() - t

    # -- weighted DBSCAN on the cells --------------------------------------------------------------------------------
    t = time.perf_counter()
    core = dens >= ms
    lims, _, nb = flat.range_search(centroids, float(np.nextafter(r2, np.float32(np.inf))))
    src_ids = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(lims.astype(np.int64)))
    near_edges = np.stack([src_ids, nb], axis=1)
    wa, wb, wc = pairs.result()
    witness_edges = np.stack([wa[wc >= _WITNESS_MIN], wb[wc >= _WITNESS_MIN]], axis=1)
    edges = np.concatenate([near_edges, witness_edges]).astype(np.int64)
    edges = np.ascontiguousarray(edges[core[edges[:, 0]] & core[edges[:, 1]]])
    parent = np.arange(n_cells, dtype=np.int64)
    size = np.ones(n_cells, dtype=np.int64)
    _core.uf_union_edges(parent, size, edges)
    cell_label, n_clusters = _core.uf_components(parent, size, core.view(np.uint8))
    stages["cells"] = time.perf_counter() - t

    # -- pass 2: label rows ------------------------------------------------------------------------------------------
    t = time.perf_counter()
    labels = _allocate_labels(n, int(dc.memory_budget) // 4)
    reach2 = np.float32(float(r2) * float(dc.reach) ** 2)
    core_at = core.copy()
    rms = np.sqrt(sq / np.maximum(counts, 1))
    reach_cell = ((np.sqrt(float(reach2)) + _RADIUS_REACH * rms) ** 2).astype(np.float32)
    bar = Progress(n, dc.progress, "cluster pass 2/2 labels", unit="row")
    for x, off in src.chunks():
        xc = _prepare(_chunk_float32(x), dc.metric, shift, off)
        dist, ids = quant.search(xc, probe)
        ok = core_at[ids] & (dist <= reach_cell[ids])
        first = ok.argmax(axis=1)
        lab = cell_label[ids[np.arange(len(ids)), first]]
        lab[~ok.any(axis=1)] = -1
        labels[off : off + len(xc)] = lab
        _release(labels, off, len(xc))
        bar.update(len(xc))
    bar.close()
    stages["pass2"] = time.perf_counter() - t

    t = time.perf_counter()
    sizes = _relabel_in_place(labels, n_clusters, dc.label_order == "size")
    stages["relabel"] = time.perf_counter() - t
    radius = np.sqrt(sq / np.maximum(counts, 1))
    info.update(
        {
            "n_cells": n_cells,
            "sample_rows": m,
            "probe": probe,
            "reach": float(dc.reach),
            "core_cells": int(core.sum()),
            "cell_edges_within_eps": len(near_edges),
            "cell_edges_witnessed": len(witness_edges),
            "cell_rows_median": float(np.median(counts)),
            "cell_rms_radius_median": float(np.median(radius[counts > 0])) if (counts > 0).any() else 0.0,
            "labels_storage": "temporary file" if isinstance(labels, np.memmap) else "memory",
            "rows_per_second_pass1": n / max(stages["pass1"], 1e-9),
            "rows_per_second_pass2": n / max(stages["pass2"], 1e-9),
        }
    )
    dc.stream_info_ = info
    dc.cell_centroids_ = centroids
    dc.cell_counts_ = counts
    dc.cell_means_ = sums / np.maximum(counts, 1)[:, None]
    dc.cell_density_ = dens
    dc.cell_labels_ = cell_label
    dc.labels_ = labels
    dc.core_sample_mask_ = None
    dc.cluster_sizes_ = sizes
    dc.n_clusters_ = len(sizes)
    dc.n_noise_ = int(n - sizes.sum())
    dc.stage_seconds_ = stages


# -- pieces ------------------------------------------------------------------------------------------------------------
class _PairCounter:
    """Counts of unordered cell pairs, merged every few chunks (memory O(distinct pairs))."""

    def __init__(self, n_cells: int) -> None:
        self.g = n_cells
        self.codes = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.pending.append(np.minimum(a, b) * self.g + np.maximum(a, b))
        self.pending_size += len(a)
        if self.pending_size > 1 << 22:
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        new, cnt = np.unique(np.concatenate(self.pending), return_counts=True)
        codes = np.concatenate([self.codes, new])
        counts = np.concatenate([self.counts, cnt])
        self.codes, inv = np.unique(codes, return_inverse=True)
        self.counts = np.bincount(inv.ravel(), weights=counts, minlength=len(self.codes)).astype(np.int64)
        self.pending, self.pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._merge()
        return self.codes // self.g, self.codes % self.g, self.counts


def _assigner(faiss: Any, centroids: np.ndarray) -> Any:
    """An IVF index over the centroids: a row is compared with the centroids of the few lists nearest to it instead
    of all of them (approximate: a row may miss its nearest centroid when that one sits in a list not probed)."""
    g, d = centroids.shape
    nlist = round(float(np.sqrt(g)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.cp.min_points_per_centroid = 1
    index.train(centroids)
    index.add(centroids)
    index.nprobe = max(4, nlist // 8)
    return index


def _sample(src: Any, m: int) -> tuple[np.ndarray, bool]:
    """``m`` evenly spaced rows as float32 ``[m, d]``; ``(rows, True)`` when that took a pass over the source."""
    n = src.n_rows
    rows = np.linspace(0, n - 1, m).round().astype(np.int64)
    if isinstance(src, ArraySource):
        # In batches, each batch's span of a memory map released at once: the kernel maps pages around every faulted
        # one, so gathering all sampled rows first would map nearly the whole file into this process.
        arr = src.array
        pages = _PageReleaser(arr)
        out = np.empty((m, src.n_features), np.float32)
        for s in range(0, m, 1024):
            r = rows[s : s + 1024]
            out[s : s + len(r)] = _chunk_float32(arr[r])
            pages.release(arr[r[0] : r[-1] + 1])
        return out, False
    if isinstance(src, TensorSource):
        return np.array(_chunk_float32(src.tensor[rows]), dtype=np.float32, order="C", copy=True), False
    out = np.empty((m, src.n_features), np.float32)
    for x, off in src.chunks():
        lo, hi = np.searchsorted(rows, [off, off + len(x)])
        if hi > lo:
            out[lo:hi] = _chunk_float32(x[rows[lo:hi] - off])
    return out, True


def _check_finite(x: np.ndarray, off: int | None) -> None:
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        where = f"rows {(bad[:5] + off).tolist()}" if off is not None else "the sampled rows"
        raise ValueError(f"x has non-finite values (NaN or inf) in {where}")


def _prepare(x: np.ndarray, metric: str, shift: np.ndarray | None, off: int) -> np.ndarray:
    """A chunk as C-contiguous float32, centred (L2) or normalised (cosine), checked finite (a copy)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    _check_finite(x, off)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if not (norms > 0).all():
            raise ValueError(
                f"metric='cosine' needs non-zero rows; rows {(np.flatnonzero(norms <= 0) + off)[:5]} are zero"
            )
        x /= norms
    elif shift is not None:
        x -= shift
    return x


def _eps_from_sample(faiss: Any, sample: np.ndarray, n: int, ms: int, metric: str) -> tuple[float, str]:
    m, d = sample.shape
    k = int(min(m, max(2, round(ms * m / n))))
    index = faiss.IndexFlatL2(d)
    index.add(sample)
    dist, _ = index.search(sample, k)
    d2 = np.sort(np.maximum(dist[:, k - 1].astype(np.float64), 0.0))
    kd = d2 / 2.0 if metric == "cosine" else np.sqrt(d2)
    eps = knee(kd)
    # The sample is m/n as dense: a k-ball there holds k n/m rows of the full data; rescale to min_samples rows.
    scale = (ms * m / (n * k)) ** (1.0 / max(d, 1))
    if metric == "cosine":
        scale = scale**2
    eps *= scale
    return float(eps), f"knee of the {k}-distance curve of a {m}-row sample, rescaled by {scale:.3g} to the full data"


def _allocate_labels(n: int, in_memory_bytes: int) -> np.ndarray:
    if n * 8 <= in_memory_bytes:
        return np.empty(n, np.int64)
    fd, path = tempfile.mkstemp(prefix="poisonguard-labels-", suffix=".bin")
    os.close(fd)
    try:
        return np.memmap(path, dtype=np.int64, mode="w+", shape=(n,))
    finally:
        os.unlink(path)  # the mapping keeps the data; the space is freed when the array goes


def _release(labels: np.ndarray, off: int, m: int) -> None:
    """Drops written pages of a disk-backed labels array from this process (the OS cache keeps them)."""
    if not isinstance(labels, np.memmap) or not hasattr(labels, "_mmap") or labels._mmap is None:
        return
    lo = off * 8 - (off * 8) % mmap.PAGESIZE
    hi = (off + m) * 8
    hi -= hi % mmap.PAGESIZE
    if hi > lo and hasattr(labels._mmap, "madvise"):
        labels._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _relabel_in_place(labels: np.ndarray, n_clusters: int, by_size: bool, chunk: int = 1 << 22) -> np.ndarray:
    """Counts cluster sizes and, with ``by_size``, renumbers by decreasing size (ties by number), in chunks."""
    n = len(labels)
    sizes = np.zeros(n_clusters, np.int64)
    for s in range(0, n, chunk):
        part = labels[s : s + chunk]
        sizes += np.bincount(part[part >= 0], minlength=n_clusters)
        _release(labels, s, len(part))
    # drop empty clusters (core cells no row reached) from the numbering
    keep = sizes > 0
    order = np.lexsort((np.arange(n_clusters), -sizes)) if by_size else np.arange(n_clusters)
    order = order[keep[order]]
    rank = np.full(n_clusters + 1, -1, np.int64)  # index -1 (noise) maps to the last entry, -1
    rank[order] = np.arange(len(order))
    if by_size or not keep.all():
        for s in range(0, n, chunk):
            labels[s : s + chunk] = rank[labels[s : s + chunk]]
            _release(labels, s, min(chunk, n - s))
    return sizes[order]


__all__ = ["default_cells", "fit_stream"]
