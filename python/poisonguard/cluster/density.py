"""DBSCAN with FAISS neighbour search, in memory and out of core.

In memory (``mode="memory"``), the result is DBSCAN's (same partition as ``sklearn.cluster.DBSCAN`` up to
floating-point ties at distance exactly ``eps``). For low dimensions (``index="kdtree"``, the default for d <= 32) the
whole of DBSCAN runs in ``_core`` on a kd-tree, exact (see ``csrc/cpu/dbscan_cpu.cpp``) and without FAISS. Otherwise,
with FAISS:

1. core points: a k-NN search with ``k = min_samples`` over all rows (the row itself included): a row is core iff its
   k-th neighbour lies within ``eps``, i.e. its ``eps``-ball holds at least ``min_samples`` rows;
2. clusters: FAISS range search of radius ``eps`` from every core row against an index of the core rows only, in
   query blocks sized to bound the result; the C++ union-find in ``_core`` joins each block's core-core pairs;
3. borders: a range search from every non-core row against the core index; a border row joins the cluster with the
   smallest number among its core neighbours (numbering by smallest core member, which is the order in which
   scikit-learn's expansion meets them, so partitions agree also for rows reachable from several clusters).

Out of core (``mode="stream"``, chosen by ``mode="auto"`` when the in-memory working set would exceed
``memory_budget``): see :func:`poisonguard.cluster._stream.fit_stream`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .._interop import describe, host_matrix, is_torch_tensor

_FAISS_HINT = (
    "DensityClustering needs FAISS, an optional dependency: pip install faiss-cpu (or pip install poisonguard[faiss])"
)

# index="auto" switches from the exact flat index to IVF above this many rows (and for d > _FLAT_MAX_DIM only at
# _FLAT_MAX_ROWS_HIGH_D): a flat search costs n^2 d, IVF about n^2 d nprobe / nlist plus the coarse step.
_FLAT_MAX_ROWS = 50_000
# Range-search results per query block (pairs); bounds the block's lims/ids/distances at ~100 MB.
_BLOCK_PAIRS = 1 << 23
# Up to this many range-search pairs (8 bytes each, plus lims) are kept for the one-pass strategy.
_KEEP_PAIRS = 1 << 25
# Rows of the sample the k-distance curve is read on when eps=None.
_KDIST_SAMPLE = 20_000
# index="auto" takes the exact kd-tree up to this many dimensions: on clustered data it is exact and 3-14x faster than
# IVF up to 32 (bench/RESULTS.md); beyond, boxes prune too little and it nears a brute-force scan.
_KDTREE_MAX_DIM = 32
# kd-tree leaf rows: leaves are scanned with vectorised distances, so large leaves beat a deep tree at d ~ 10.
_KDTREE_LEAF = 128


def import_faiss() -> Any:
    """The ``faiss`` module, or ImportError naming the package to install."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(_FAISS_HINT) from exc
    return faiss


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


class DensityClustering:
    """DBSCAN: an exact kd-tree in ``_core`` for low dimensions, FAISS neighbour search above, out of core for
    sources larger than memory.

    Parameters
    ----------
    eps : float or None
        Neighbourhood radius (Euclidean distance for ``metric="l2"``, cosine distance ``1 - cos`` for
        ``"cosine"``). ``None`` picks it from the k-distance curve (k = ``min_samples``; the knee of the sorted k-th
        neighbour distances of up to 20 000 evenly spaced rows); :attr:`eps_` and :meth:`report` say which.
    min_samples : int
        Rows (the row itself included) an ``eps``-ball must hold for its centre to be a core row; ``>= 1``.
    metric : {"l2", "cosine"}
        ``"cosine"`` normalises rows (a copy) and searches with L2: ``|a - b|^2 = 2 (1 - cos)``; zero rows are an
        error.
    index : {"auto", "kdtree", "flat", "ivf"}
        Neighbour search. ``"kdtree"``: exact, in ``_core`` (no FAISS needed unless ``eps=None``), fast for low d.
        ``"flat"``: FAISS, exact. ``"ivf"``: IndexIVFFlat, approximate (a neighbour in a cell that is not
        probed is missed, so a few rows may turn noise or clusters split); ``nlist = 4 sqrt(n)`` cells, ``nprobe``
        probed (default ``max(16, nlist // 64)``). ``"auto"``: kdtree for d <= 32 (L2 or cosine), else flat up to 50 000
        rows and IVF above. With faiss-gpu and a
        GPU (``faiss.get_num_gpus()``) the k-NN step of a flat index runs on the GPU; FAISS has no GPU range search,
        so those stay on the CPU.
    seed : int
        Seeds the IVF training sample and the out-of-core k-means (results are deterministic for a seed).
    mode : {"auto", "memory", "stream"}
        ``"stream"`` clusters out of core (two passes over the source; approximate, see ``_stream``). ``"auto"``:
        stream when the in-memory working set (about ``n (8 d + 12 min_samples + 64)`` bytes) exceeds
        ``memory_budget``.
    memory_budget : int
        Bytes, for ``mode="auto"`` and for the out-of-core labels (a temporary memory-mapped file beyond it).
    nprobe : int or None
        Cells probed by an IVF index (default ``max(16, nlist // 64)``).
    n_cells, reach, sample_rows : out-of-core parameters, see :func:`poisonguard.cluster._stream.fit_stream`.
    label_order : {"size", "index"}
        Cluster numbering: ``"size"`` = decreasing size, ties by smallest member; ``"index"`` = by smallest core
        member (scikit-learn's numbering).
    chunk_rows : int
        Rows per chunk when reading a source.
    progress : bool
        Progress lines for the passes over a source.

    Attributes (after :meth:`fit`)
    ------------------------------
    labels_ : int64 [n]
        Cluster of every row, ``0 .. n_clusters_ - 1``, ``-1`` for noise. Out of core with ``n * 8`` bytes above
        ``memory_budget``: a temporary memory-mapped array.
    core_sample_mask_ : bool [n] (in memory only; ``None`` out of core)
    eps_ : float
    n_clusters_ : int
    mode_ : "memory" or "stream"
    """

    def __init__(
        self,
        eps: float | None = None,
        min_samples: int = 5,
        metric: str = "l2",
        index: str = "auto",
        seed: int = 0,
        *,
        mode: str = "auto",
        memory_budget: int = 2 * 2**30,
        nprobe: int | None = None,
        n_cells: int | None = None,
        reach: float = 1.0,
        sample_rows: int | None = None,
        label_order: str = "size",
        chunk_rows: int = 65536,
        progress: bool = False,
    ) -> None:
        self.eps = eps
        self.min_samples = min_samples
        self.metric = metric
        self.index = index
        self.seed = seed
        self.mode = mode
        self.memory_budget = memory_budget
        self.nprobe = nprobe
        self.n_cells = n_cells
        self.reach = reach
        self.sample_rows = sample_rows
        self.label_order = label_order
        self.chunk_rows = chunk_rows
        self.progress = progress

    # -- parameters --------------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.eps is not None:
            if isinstance(self.eps, (bool, np.bool_)) or not isinstance(
                self.eps, (int, float, np.integer, np.floating)
            ):
                raise TypeError(f"eps must be a number or None, got {type(self.eps).__name__}")
            if not math.isfinite(self.eps) or self.eps < 0:
                raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        _check_int(self.min_samples, "min_samples", 1)
        _check_int(self.seed, "seed", 0)
        _check_int(self.chunk_rows, "chunk_rows", 1)
        _check_int(self.memory_budget, "memory_budget", 0)
        if self.nprobe is not None:
            _check_int(self.nprobe, "nprobe", 1)
        if self.n_cells is not None:
            _check_int(self.n_cells, "n_cells", 1)
        if self.sample_rows is not None:
            _check_int(self.sample_rows, "sample_rows", 1)
        if not isinstance(self.reach, (int, float)) or not self.reach > 0:
            raise ValueError(f"reach must be a number > 0, got {self.reach!r}")
        for name, allowed in (
            ("metric", ("l2", "cosine")),
            ("index", ("auto", "kdtree", "flat", "ivf")),
            ("mode", ("auto", "memory", "stream")),
            ("label_order", ("size", "index")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def _memory_bytes(self, n: int, d: int) -> int:
        return n * (8 * d + 12 * int(self.min_samples) + 64)

    # -- fitting -----------------------------------------------------------------------------------------------------
    def fit(self, x: Any, y: Any = None) -> DensityClustering:
        """Clusters the rows of ``x``: a 2-D float array (numpy, memory maps included; torch CPU tensor of
        float16/bfloat16/float32/float64), or any source :func:`poisonguard.sources.as_source` reads (``.npy``
        path, shard folder, zarr, HDF5, :class:`~poisonguard.sources.Source`). ``y`` is ignored.

        Copies: in memory the rows are converted once to a C-contiguous float32 array, centred by their mean (L2) or
        normalised (cosine), and FAISS holds its own copy of the core rows. Errors: TypeError for a non-float dtype
        or an unreadable type, ValueError for a shape that is not 2-D, non-finite values, or bad parameters.
        """
        self._check_params()
        t0 = time.perf_counter()
        arr, n, d, src = _open_input(x, self.chunk_rows)
        if d == 0 and n > 0:
            raise ValueError(f"x has {n} rows but no features (shape ({n}, 0)); expected at least one column")
        mode = self.mode
        if mode == "auto":
            mode = "stream" if self._memory_bytes(n, d) > self.memory_budget else "memory"
        self.n_features_in_ = d
        if mode == "stream":
            from ._stream import fit_stream

            src = src if src is not None else _array_source(arr, self.chunk_rows)
            fit_stream(self, import_faiss(), src)
        else:
            xf = _load_float32(arr, src, n, d)
            if self._index_kind(n, d) == "kdtree":
                self._fit_kdtree(xf)
            else:
                self._fit_memory(import_faiss(), xf)
        self.mode_ = mode
        self.seconds_ = time.perf_counter() - t0
        return self

    def fit_predict(self, x: Any, y: Any = None) -> np.ndarray:
        """:meth:`fit`, then :attr:`labels_`."""
        return self.fit(x).labels_

    def _fit_memory(self, faiss: Any, xf: np.ndarray) -> None:
        n = len(xf)
        stages = self._prepare(xf, centre=True)  # FAISS's |x|^2 + |y|^2 - 2xy loses less on centred rows
        ms = int(self.min_samples)
        self.index_ = {"kind": "none", "exact": True}
        self.strategy_ = None
        if n == 0:
            self._set_empty(stages)
            return

        t = time.perf_counter()
        index, info = self._build_index(faiss, xf)
        self.index_ = info
        stages["index"] = time.perf_counter() - t
        if self.eps is None:
            t = time.perf_counter()
            self.eps_, self.eps_source_, self.kdist_ = self._choose_eps(index, xf)
            stages["choose_eps"] = time.perf_counter() - t
        else:
            self.eps_, self.eps_source_ = float(self.eps), "given"
        r2 = self._radius2(self.eps_)

        radius = float(np.nextafter(np.float32(r2), np.float32(np.inf)))  # FAISS keeps dist < radius
        if 1 < ms <= n and self._estimate_pairs(index, xf, radius) <= _KEEP_PAIRS:
            self.strategy_ = "one range pass, pairs kept"
            labels, core = self._one_pass(index, xf, radius, ms, stages)
        else:
            self.strategy_ = "k-NN core test, then range search from core and from non-core rows"
            labels, core = self._three_pass(faiss, index, xf, r2, radius, ms, stages)
        self._set_result(labels, core, stages)

    def _prepare(self, xf: np.ndarray, centre: bool) -> dict[str, float]:
        """Normalises the rows in place (cosine; zero rows are an error) or, with ``centre``, subtracts their mean;
        returns the stage timings so far."""
        t = time.perf_counter()
        n = len(xf)
        if self.metric == "cosine":
            norms = np.linalg.norm(xf, axis=1, keepdims=True)
            if n and not (norms > 0).all():
                bad = np.flatnonzero(norms[:, 0] <= 0)[:5].tolist()
                raise ValueError(f"metric='cosine' needs non-zero rows; rows {bad} are zero")
            xf /= norms
        elif centre and n:
            xf -= xf.mean(axis=0, dtype=np.float64).astype(np.float32)
        return {"prepare": time.perf_counter() - t}

    def _set_empty(self, stages: dict) -> None:
        self.eps_ = float(self.eps) if self.eps is not None else float("nan")
        self.eps_source_ = "given" if self.eps is not None else "no rows"
        self._set_result(np.empty(0, np.int64), np.zeros(0, bool), stages)

    def _fit_kdtree(self, xf: np.ndarray) -> None:
        """Exact DBSCAN in ``_core`` on a kd-tree (rows not centred: the kernel's differences are exact)."""
        from .. import _core

        n = len(xf)
        stages = self._prepare(xf, centre=False)
        self.index_ = {"kind": "kdtree", "exact": True, "leaf_size": _KDTREE_LEAF}
        self.strategy_ = "kd-tree: core counts, joins from recorded neighbours, join search, borders"
        if n == 0:
            self._set_empty(stages)
            return
        if self.eps is None:
            t = time.perf_counter()
            faiss = import_faiss()
            index, _ = self._build_index(faiss, xf, kind="flat" if n <= _FLAT_MAX_ROWS else "ivf")
            self.eps_, self.eps_source_, self.kdist_ = self._choose_eps(index, xf)
            del index
            stages["choose_eps"] = time.perf_counter() - t
        else:
            self.eps_, self.eps_source_ = float(self.eps), "given"
        labels, core, _, seconds = _core.dbscan_kdtree(
            xf, self._radius2(self.eps_), int(self.min_samples), _KDTREE_LEAF
        )
        for name, sec in zip(("tree", "core", "join_recorded", "join_search", "border"), seconds):
            stages[name] = float(sec)
        self._set_result(labels, core, stages)

    def _estimate_pairs(self, index: Any, xf: np.ndarray, radius: float) -> float:
        """Range-search results of all rows, extrapolated from up to 1000 evenly spaced rows."""
        n = len(xf)
        m = min(n, 1000)
        rows = np.linspace(0, n - 1, m).round().astype(np.int64)
        lims, _, _ = index.range_search(np.ascontiguousarray(xf[rows]), radius)
        return float(lims[-1]) * n / m

    def _one_pass(self, index: Any, xf: np.ndarray, radius: float, ms: int, stages: dict) -> tuple:
        """One range search from every row; the pairs are kept (few enough), core rows read off the counts."""
        from .. import _core

        n = len(xf)
        t = time.perf_counter()
        blocks = []
        counts = np.empty(n, dtype=np.int64)
        for rows, lims, ids in _range_blocks(index, xf, None, radius):
            lims = lims.view(np.int64)
            counts[rows] = np.diff(lims)
            blocks.append((rows, lims, ids))
        core = counts >= ms
        stages["range"] = time.perf_counter() - t
        t = time.perf_counter()
        core_u8 = core.view(np.uint8)
        parent = np.arange(n, dtype=np.int64)
        size = np.ones(n, dtype=np.int64)
        for rows, lims, ids in blocks:
            _core.uf_union_block(parent, size, lims, ids, rows, core_u8)
        labels, _ = _core.uf_components(parent, size, core_u8)
        del parent, size
        stages["union"] = time.perf_counter() - t
        t = time.perf_counter()
        core_label = labels.copy()
        for rows, lims, ids in blocks:
            _core.border_labels(lims, ids, rows, core_label, labels)
        stages["border"] = time.perf_counter() - t
        return labels, core

    def _three_pass(self, faiss: Any, index: Any, xf: np.ndarray, r2: float, radius: float, ms: int, stages: dict):
        """k-NN core test; range search from core rows against the core rows (unions); from the others (borders)."""
        from .. import _core

        n = len(xf)
        t = time.perf_counter()
        core = self._core_mask(index, xf, r2, ms)
        stages["core"] = time.perf_counter() - t
        labels = np.full(n, -1, dtype=np.int64)
        core_idx = np.flatnonzero(core)
        n_core = len(core_idx)
        if n_core == 0:
            return labels, core
        t = time.perf_counter()
        x_core = xf[core_idx]
        cindex, _ = self._build_index(faiss, x_core, train_on=xf)
        parent = np.arange(n_core, dtype=np.int64)
        size = np.ones(n_core, dtype=np.int64)
        ones = np.ones(n_core, dtype=np.uint8)
        for rows, lims, ids in _range_blocks(cindex, x_core, None, radius):
            _core.uf_union_block(parent, size, lims, ids, rows, ones)
        core_label, _ = _core.uf_components(parent, size, None)
        del parent, size, ones
        labels[core_idx] = core_label
        stages["union"] = time.perf_counter() - t
        t = time.perf_counter()
        other = np.flatnonzero(~core)
        if len(other):
            for rows, lims, ids in _range_blocks(cindex, xf, other, radius):
                _core.border_labels(lims, ids, rows, core_label, labels)
        stages["border"] = time.perf_counter() - t
        return labels, core

    def _set_result(self, labels: np.ndarray, core: np.ndarray | None, stages: dict) -> None:
        if self.label_order == "size":
            labels = relabel_by_size(labels)
        self.labels_ = labels
        self.core_sample_mask_ = core
        valid = labels[labels >= 0]
        self.cluster_sizes_ = np.bincount(valid) if len(valid) else np.zeros(0, np.int64)
        self.n_clusters_ = len(self.cluster_sizes_)
        self.n_noise_ = int(len(labels) - len(valid))
        self.stage_seconds_ = stages

    # -- pieces ------------------------------------------------------------------------------------------------------
    def _radius2(self, eps: float) -> float:
        """The squared-L2 radius of an ``eps`` neighbourhood in the searched space."""
        return 2.0 * eps if self.metric == "cosine" else eps * eps

    def _index_kind(self, n: int, d: int) -> str:
        if self.index != "auto":
            return self.index
        if d <= _KDTREE_MAX_DIM:
            return "kdtree"
        return "flat" if n <= _FLAT_MAX_ROWS else "ivf"

    def _build_index(
        self, faiss: Any, xb: np.ndarray, train_on: np.ndarray | None = None, kind: str | None = None
    ) -> tuple[Any, dict]:
        n, d = xb.shape
        if kind is None:
            kind = self._index_kind(n if train_on is None else len(train_on), d)
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
            index.add(xb)
            return index, {"kind": "flat", "exact": True}
        base = xb if train_on is None else train_on
        nlist = int(max(1, min(len(base) // 39, round(4 * math.sqrt(len(base))))))
        nprobe = int(self.nprobe) if self.nprobe is not None else max(16, nlist // 64)
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
        index.cp.seed = int(self.seed)
        rng = np.random.default_rng(self.seed)
        m = min(len(base), nlist * 64)
        sample = base[np.sort(rng.choice(len(base), m, replace=False))] if m < len(base) else base
        index.train(sample)
        index.add(xb)
        index.nprobe = min(nprobe, nlist)
        return index, {"kind": "ivf", "exact": False, "nlist": nlist, "nprobe": int(index.nprobe)}

    def _core_mask(self, index: Any, xf: np.ndarray, r2: float, ms: int) -> np.ndarray:
        n = len(xf)
        if ms == 1:
            return np.ones(n, dtype=bool)
        if ms > n:
            return np.zeros(n, dtype=bool)
        search_index = _gpu_index(index) if self.index_.get("kind") == "flat" else index
        core = np.empty(n, dtype=bool)
        step = max(1024, _BLOCK_PAIRS // (4 * ms))
        thr = np.float32(r2)
        for s in range(0, n, step):
            dist, _ = search_index.search(xf[s : s + step], ms)
            core[s : s + step] = dist[:, ms - 1] <= thr
        return core

    def _choose_eps(self, index: Any, xf: np.ndarray) -> tuple[float, str, np.ndarray]:
        n = len(xf)
        k = min(int(self.min_samples), n)
        m = min(n, _KDIST_SAMPLE)
        rows = np.linspace(0, n - 1, m).round().astype(np.int64) if m < n else np.arange(n)
        dist, _ = index.search(np.ascontiguousarray(xf[rows]), k)
        d2 = np.sort(np.maximum(dist[:, k - 1].astype(np.float64), 0.0))
        d2 = d2[np.isfinite(d2)]
        kd = d2 / 2.0 if self.metric == "cosine" else np.sqrt(d2)
        eps = knee(kd)
        return float(eps), f"knee of the {k}-distance curve of {m} rows", kd

    # -- reporting ---------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Parameters, the eps used and how it was chosen, cluster sizes, noise count, mode, index and timings, as
        plain JSON-able types."""
        if not hasattr(self, "labels_"):
            raise RuntimeError("call fit() first")
        out = {
            "method": "dbscan",
            "params": {
                "eps": self.eps,
                "min_samples": int(self.min_samples),
                "metric": self.metric,
                "index": self.index,
                "mode": self.mode,
                "seed": int(self.seed),
                "label_order": self.label_order,
            },
            "eps": None if math.isnan(self.eps_) else float(self.eps_),
            "eps_source": self.eps_source_,
            "mode": "in memory" if self.mode_ == "memory" else "out of core",
            "index": dict(self.index_),
            "strategy": getattr(self, "strategy_", None),
            "n_samples": len(self.labels_),
            "n_clusters": int(self.n_clusters_),
            "cluster_sizes": [int(c) for c in self.cluster_sizes_],
            "n_noise": int(self.n_noise_),
            "n_core": None if self.core_sample_mask_ is None else int(self.core_sample_mask_.sum()),
            "seconds": float(self.seconds_),
            "stage_seconds": {k: float(v) for k, v in self.stage_seconds_.items()},
        }
        if getattr(self, "stream_info_", None) is not None and self.mode_ == "stream":
            out["stream"] = dict(self.stream_info_)
        return out


# -- helpers -------------------------------------------------------------------------------------------------------
def knee(curve: np.ndarray) -> float:
    """The knee of an increasing curve (sorted k-distances): the point farthest below the chord from its first to
    its last value, on both axes scaled to [0, 1]. A flat curve returns its value."""
    curve = np.asarray(curve, dtype=np.float64)
    if len(curve) == 0:
        return float("nan")
    lo, hi = curve[0], curve[-1]
    if not hi > lo:
        return float(hi)
    xs = np.linspace(0.0, 1.0, len(curve))
    ys = (curve - lo) / (hi - lo)
    return float(curve[int(np.argmax(xs - ys))])


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumbers clusters by decreasing size, ties by the current number (-1 stays)."""
    valid = labels >= 0
    if not valid.any():
        return labels
    sizes = np.bincount(labels[valid])
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[order] = np.arange(len(sizes))
    out = labels.copy() if not isinstance(labels, np.memmap) else labels
    out[valid] = rank[labels[valid]]
    return out


def _range_blocks(index: Any, xq: np.ndarray, rows: np.ndarray | None, radius: float):
    """Yields ``(rows int64 [m], lims [m + 1], ids)`` of a range search from ``xq[rows]`` (all rows when None), in
    blocks whose size adapts to keep about _BLOCK_PAIRS results per block."""
    n = len(xq) if rows is None else len(rows)
    step, s = 1024, 0
    while s < n:
        e = min(n, s + step)
        if rows is None:
            r = np.arange(s, e, dtype=np.int64)
            q = xq[s:e]
        else:
            r = np.ascontiguousarray(rows[s:e], dtype=np.int64)
            q = xq[r]
        lims, _, ids = index.range_search(q, radius)
        yield r, lims, ids
        per = max(1.0, float(lims[-1]) / (e - s))
        step = int(min(1 << 16, max(64, _BLOCK_PAIRS / per)))
        s = e


def _gpu_index(index: Any) -> Any:
    """A GPU copy of a flat index when faiss-gpu sees a GPU, else the index itself."""
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() <= 0:
        return index
    try:  # pragma: no cover - needs faiss-gpu and a device
        return faiss.index_cpu_to_all_gpus(index)
    except Exception:  # pragma: no cover
        return index


def _open_input(x: Any, chunk_rows: int) -> tuple[np.ndarray | None, int, int, Any]:
    """``(array or None, n, d, source or None)``: arrays and tensors are validated and kept as they are; anything
    else is opened with :func:`poisonguard.sources.as_source`."""
    if isinstance(x, np.ndarray) or is_torch_tensor(x):
        arr, _ = host_matrix(x, "x")
        return x, int(arr.shape[0]), int(arr.shape[1]), None
    from ..sources import Source, as_source

    is_path = isinstance(x, (str, bytes)) or hasattr(x, "__fspath__")
    if not isinstance(x, Source) and not is_path and not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"x must be a 2-D float array, a torch CPU tensor or a poisonguard source, got {describe(x)}")
    src = as_source(x, chunk_rows=chunk_rows)
    return None, src.n_rows, src.n_features, src


def _chunk_float32(x: Any) -> np.ndarray:
    """A chunk (numpy array or torch CPU tensor) as float32 numpy; a view when it already is."""
    if is_torch_tensor(x):
        import torch

        t = x.detach()
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        return t.numpy()
    return np.asarray(x, dtype=np.float32)


def _load_float32(arr: Any, src: Any, n: int, d: int) -> np.ndarray:
    """All rows as a new C-contiguous float32 array (the one copy of the in-memory path), checked finite."""
    out = np.empty((n, d), dtype=np.float32)
    if arr is not None:
        out[...] = _chunk_float32(arr)
    else:
        for x, off in src.chunks():
            out[off : off + len(x)] = _chunk_float32(x)
    if n and not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        raise ValueError(f"x has non-finite values (NaN or inf) in {len(bad)} row(s), first {bad[:5].tolist()}")
    return out


def _array_source(arr: Any, chunk_rows: int) -> Any:
    from ..sources import as_source

    return as_source(arr, chunk_rows=chunk_rows)
