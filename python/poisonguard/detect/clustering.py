"""Activation clustering (Chen et al. 2018, arXiv 1811.03728) over streamed activations.

Per class: reduce the activations to a few dimensions, split them into clusters, and call a cluster poison by one of
four rules (those of ART's ``ClusteringAnalyzer``). The reduction reads the source twice (streaming per-class
covariance, then the fused centre-and-project pass); the clustering runs on the ``[n_c, k]`` reduced rows of one class
at a time.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ops.covariance import _as_int
from ._base import detector_report, spread_gate
from ._twopass import Projected, project_by_class

_PRESETS = ("default", "art")
_REDUCE = ("pca", "ica", "umap")
_METHODS = ("kmeans", "dbscan", "hdbscan")
_ANALYSES = ("smaller", "relative-size", "distance", "silhouette")

# ART 1.20's ClusteringAnalyzer defaults.
ART_SIZE_THRESHOLD = 0.35
ART_SILHOUETTE_THRESHOLD = 0.1
_SIZE_DECIMALS = 2  # ART rounds cluster shares to 2 decimals before comparing them with the threshold
_SILHOUETTE_DECIMALS = 4
_FAISS_SERIAL_BELOW = 1 << 22  # elements (rows x dims) under which k-means (FAISS, sklearn) runs on one thread


# -- the four rules -------------------------------------------------------------------------------------------------


def rule_smaller(sizes: np.ndarray) -> np.ndarray:
    """``smaller``: the cluster with the fewest members is poison (the first one on ties). ``sizes [K]`` → bool [K]."""
    out = np.zeros(len(sizes), dtype=bool)
    if len(sizes):
        out[int(np.argmin(sizes))] = True
    return out


def rule_relative_size(sizes: np.ndarray, size_threshold: float = ART_SIZE_THRESHOLD) -> np.ndarray:
    """``relative-size``: a cluster is poison when its share of the class, rounded to 2 decimals, is below
    ``size_threshold`` (itself rounded to 2 decimals). ``sizes [K]`` → bool [K]."""
    sizes = np.asarray(sizes, dtype=np.float64)
    total = sizes.sum()
    if total <= 0:
        return np.zeros(len(sizes), dtype=bool)
    return np.round(sizes / total, _SIZE_DECIMALS) < round(size_threshold, _SIZE_DECIMALS)


def rule_silhouette(
    sizes: np.ndarray,
    silhouette: float,
    size_threshold: float = ART_SIZE_THRESHOLD,
    silhouette_threshold: float = ART_SILHOUETTE_THRESHOLD,
) -> np.ndarray:
    """``silhouette``: the clusters that ``relative-size`` calls poison stay poison only when the class's mean
    silhouette (rounded to 4 decimals) exceeds ``silhouette_threshold``; otherwise the class is clean."""
    small = rule_relative_size(sizes, size_threshold)
    if not round(float(silhouette), _SILHOUETTE_DECIMALS) > round(silhouette_threshold, _SILHOUETTE_DECIMALS):
        small[:] = False
    return small


def rule_distance(cluster_centres: list[np.ndarray], class_centres: np.ndarray) -> list[np.ndarray]:
    """``distance`` (two clusters per class): cluster j of class c is poison when, for some other class k, it is
    closer to k's centre than to c's while the other cluster of c is farther from k's centre than from c's.

    ``cluster_centres[c]`` ``[2, k]`` (NaN rows for missing clusters; a class with other than 2 rows is left clean),
    ``class_centres [G, k]`` (NaN rows for classes without data). Returns one bool [2] per class."""
    g = len(cluster_centres)
    out = []
    for c in range(g):
        cc = cluster_centres[c]
        flag = np.zeros(len(cc), dtype=bool)
        if len(cc) != 2 or not np.isfinite(cc).all() or not np.isfinite(class_centres[c]).all():
            out.append(flag)
            continue
        own = np.linalg.norm(cc - class_centres[c], axis=1)  # [2]
        for k in range(g):
            if k == c or not np.isfinite(class_centres[k]).all() or class_centres[k].shape != cc[0].shape:
                continue
            other = np.linalg.norm(cc - class_centres[k], axis=1)
            closer, farther = other < own, other > own
            flag[0] |= bool(closer[0] and farther[1])
            flag[1] |= bool(closer[1] and farther[0])
        out.append(flag)
    return out


def sampled_silhouette(z: np.ndarray, labels: np.ndarray, max_rows: int = 10000, seed: int = 0) -> float:
    """Mean silhouette coefficient of the clustering ``labels`` of ``z`` ``[n, k]`` (noise ``-1`` excluded), on at
    most ``max_rows`` rows drawn without replacement (seeded) — O(max_rows²·k) time, O(block·max_rows) memory.
    Samples alone in their cluster count 0 (sklearn's convention); fewer than 2 clusters → 0."""
    keep = labels >= 0
    z, labels = z[keep], labels[keep]
    n = len(z)
    if n > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
        z, labels = z[pick], labels[pick]
        n = max_rows
    ids, lab = np.unique(labels, return_inverse=True)
    m = len(ids)
    if m < 2 or m >= n:
        return 0.0
    z = np.ascontiguousarray(z, dtype=np.float64)
    sq = np.einsum("ij,ij->i", z, z)
    counts = np.bincount(lab, minlength=m).astype(np.float64)
    onehot = np.zeros((n, m))
    onehot[np.arange(n), lab] = 1.0
    s = np.zeros(n)
    block = max(1, min(n, (32 << 20) // (8 * n)))  # ~32 MB of distances at a time
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        d2 = sq[b0:b1, None] + sq[None, :] - 2.0 * (z[b0:b1] @ z.T)
        dist = np.sqrt(np.maximum(d2, 0.0))
        sums = dist @ onehot  # [b, m] summed distance to each cluster
        own = lab[b0:b1]
        n_own = counts[own]
        a = sums[np.arange(b1 - b0), own] / np.maximum(n_own - 1, 1)
        other = sums / counts
        other[np.arange(b1 - b0), own] = np.inf
        bb = other.min(axis=1)
        denom = np.maximum(a, bb)
        val = np.where(denom > 0, (bb - a) / np.where(denom > 0, denom, 1.0), 0.0)
        s[b0:b1] = np.where(n_own > 1, val, 0.0)
    return float(s.mean())


# -- clustering back ends -------------------------------------------------------------------------------------------


def _kmeans_numpy(z: np.ndarray, k: int, seed: int, n_iter: int = 50, n_init: int = 3) -> np.ndarray:
    """Lloyd's k-means with k-means++ starts (seeded), best of ``n_init`` by inertia; the fallback without FAISS."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    sq = np.einsum("ij,ij->i", z, z)
    for _ in range(n_init):
        centres = [z[rng.integers(len(z))]]
        d2 = np.maximum(sq - 2 * z @ centres[0] + centres[0] @ centres[0], 0)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else None
            centres.append(z[rng.choice(len(z), p=p)])
            d2 = np.minimum(d2, np.maximum(sq - 2 * z @ centres[-1] + centres[-1] @ centres[-1], 0))
        c = np.array(centres)
        lab = None
        for _ in range(n_iter):
            dist = sq[:, None] - 2 * z @ c.T + np.einsum("ij,ij->i", c, c)[None, :]
            new = np.argmin(dist, axis=1)
            if lab is not None and np.array_equal(new, lab):
                break
            lab = new
            for j in range(k):
                members = lab == j
                if members.any():
                    c[j] = z[members].mean(axis=0)
        inertia = float(np.maximum(dist[np.arange(len(z)), lab], 0).sum())
        if inertia < best_inertia:
            best, best_inertia = lab.copy(), inertia
    return best.astype(np.int64)


def _kmeans_faiss(z: np.ndarray, k: int, seed: int, fit_rows: int) -> np.ndarray:
    import faiss

    x = np.ascontiguousarray(z, dtype=np.float32)
    params = {"niter": 25, "nredo": 3, "seed": int(seed) & 0x7FFFFFFF, "verbose": False}
    params["max_points_per_centroid"] = max(1, -(-fit_rows // k))
    params["min_points_per_centroid"] = 1  # small classes: no FAISS warning, the fit simply uses every row
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        params["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    km = faiss.Kmeans(x.shape[1], k, **params)
    threads = faiss.omp_get_max_threads()
    if x.size < _FAISS_SERIAL_BELOW:
        # OpenMP workers cost more than they give on a class this small (20x slower on two busy cores).
        faiss.omp_set_num_threads(1)
    try:
        km.train(x)
        _, assign = km.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    return assign[:, 0].astype(np.int64)


def _kmeans_sklearn(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    try:
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        raise ImportError("preset='art' clusters with scikit-learn's KMeans, as ART: pip install scikit-learn") from exc

    # ART 1.20 calls KMeans(n_clusters=k) with sklearn's other defaults; only the seed is fixed here.
    with warnings.catch_warnings(), threadpool_limits(1 if z.size < _FAISS_SERIAL_BELOW else None, "openmp"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters: fewer clusters
        return KMeans(n_clusters=k, random_state=seed).fit_predict(z).astype(np.int64)


def _density(method: str, z: np.ndarray, det: ActivationClustering) -> np.ndarray:
    """Density clustering of one class's reduced rows: labels ``[n]`` int64, ``-1`` = noise. Classes larger than
    ``fit_rows`` are clustered on ``fit_rows`` evenly spaced rows; the others take the label of their nearest fitted
    row."""
    n = len(z)
    fit_idx = np.linspace(0, n - 1, det.fit_rows).astype(np.int64) if n > det.fit_rows else None
    zf = z if fit_idx is None else z[fit_idx]
    if method == "dbscan":
        try:
            from ..cluster import DensityClustering
        except ImportError as exc:  # pragma: no cover - depends on the build
            raise ImportError("method='dbscan' needs poisonguard.cluster.DensityClustering (and faiss-cpu)") from exc
        dc = DensityClustering(eps=det.eps, min_samples=det.min_samples, metric="l2", seed=det.seed).fit(zf)
        lab = np.asarray(dc.labels_, dtype=np.int64)
    else:
        mcs = det.min_cluster_size if det.min_cluster_size is not None else max(det.min_samples, len(zf) // 100)
        mcs = max(2, min(mcs, len(zf)))
        try:
            import hdbscan

            hd = hdbscan.HDBSCAN(
                min_cluster_size=mcs, min_samples=det.min_samples, allow_single_cluster=True, core_dist_n_jobs=1
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the package's own deprecation chatter (sklearn internals)
                lab = hd.fit_predict(np.ascontiguousarray(zf, dtype=np.float64))
        except ImportError:
            try:
                from sklearn.cluster import HDBSCAN
            except ImportError as exc:
                raise ImportError(
                    "method='hdbscan' needs the optional package 'hdbscan' or scikit-learn >= 1.3: pip install hdbscan"
                ) from exc
            hd = HDBSCAN(min_cluster_size=mcs, min_samples=det.min_samples, allow_single_cluster=True, copy=True)
            lab = hd.fit_predict(np.ascontiguousarray(zf, dtype=np.float64))
        lab = np.asarray(lab, dtype=np.int64)
    if fit_idx is None:
        return lab
    return lab[_nearest(zf, z)]


def _nearest(ref: np.ndarray, q: np.ndarray, block: int = 4096) -> np.ndarray:
    """Index of the nearest row of ``ref`` for every row of ``q`` (exact, blocked)."""
    sq = np.einsum("ij,ij->i", ref, ref)
    out = np.empty(len(q), dtype=np.int64)
    for s in range(0, len(q), block):
        out[s : s + block] = np.argmin(sq[None, :] - 2.0 * q[s : s + block] @ ref.T, axis=1)
    return out


# -- per-class bookkeeping --------------------------------------------------------------------------------------------


@dataclass
class _ClassFit:
    idx: np.ndarray  # sample indices of the class
    clusters: np.ndarray  # [n_c] int64 cluster ids (0..K-1), -1 = noise
    sizes: np.ndarray  # [K]
    main: int  # the largest cluster
    separation: np.ndarray  # [K] Ashman's D of each cluster against the main one along the line of their centres
    silhouette: float
    medians: np.ndarray  # [K, k] coordinate-wise medians of each cluster (the distance rule)
    centre: np.ndarray  # [k] median of the class
    extra: dict = field(default_factory=dict)


def _separation(z: np.ndarray, clusters: np.ndarray, k: int, main: int) -> np.ndarray:
    """Ashman's D = √2·|m_j − m_main| / √(s_j² + s_main²) of the 1-D projections of cluster j and the main cluster
    on the unit vector between their centroids. Cutting one Gaussian in two gives D ≈ 2.6–2.8; separate groups
    give much more."""
    out = np.zeros(k)
    in_main = clusters == main
    c_main = z[in_main].mean(axis=0)
    for j in range(k):
        members = clusters == j
        if j == main or not members.any():
            continue
        u = z[members].mean(axis=0) - c_main
        norm = float(np.linalg.norm(u))
        if norm == 0:
            continue
        u /= norm
        pj, pm = z[members] @ u, z[in_main] @ u
        spread = np.sqrt(pj.var() + pm.var())
        out[j] = np.inf if spread == 0 else np.sqrt(2) * abs(pj.mean() - pm.mean()) / spread
    return out


class ActivationClustering:
    """Activation clustering (Chen et al. 2018): per class, reduce, cluster, and call clusters poison by a rule.

    Parameters
    ----------
    n_components : int, default 10
        Dimensions per class after the reduction (capped at ``d`` and the class size − 1).
    reduce : ``"pca"`` | ``"ica"`` | ``"umap"``
        ``"pca"``: projections on the top ``n_components`` eigenvectors of the class covariance (centred, not
        whitened — as sklearn's PCA), from the streaming covariance and the fused projection pass. ``"ica"``: FastICA
        (scikit-learn, ``whiten="unit-variance"``, seeded) fitted on at most ``fit_rows`` evenly spaced PCA-reduced
        rows of each class and applied to all of them (the same as ART's FastICA on the raw activations, whose
        first step is the PCA whitening to ``n_components``). ``"umap"``: umap-learn fitted on at most ``fit_rows``
        rows of each class (optional extra; for pictures and small sets).
    method : ``"kmeans"`` | ``"dbscan"`` | ``"hdbscan"``
        ``"kmeans"``: ``n_clusters`` clusters, FAISS k-means (k-means++ starts, best of 3, seeded) fitted on at most
        ``fit_rows`` rows then every row assigned, or plain numpy Lloyd iterations when FAISS is absent.
        ``"dbscan"``: :class:`poisonguard.cluster.DensityClustering` (``eps``, ``min_samples``). ``"hdbscan"``: the
        ``hdbscan`` package (or scikit-learn's ``HDBSCAN``), ``min_cluster_size`` (default 1% of the class, at least
        ``min_samples``), one cluster allowed. Density methods are fitted on at most ``fit_rows`` evenly spaced rows;
        the others take the label of their nearest fitted row. Noise (``-1``) is never a cluster: it is not flagged,
        and it scores by its distance.
    analysis : ``"smaller"`` | ``"relative-size"`` | ``"distance"`` | ``"silhouette"``; default ``"relative-size"``
        (``"smaller"`` with ``preset="art"``). ART's four rules (see :func:`rule_smaller`, :func:`rule_relative_size`,
        :func:`rule_distance`, :func:`rule_silhouette`): the smallest cluster; every cluster whose share (2 decimals)
        is below ``size_threshold``; a cluster nearer another class's centre than its own while its sibling is not;
        relative size, kept only when the class's silhouette exceeds ``silhouette_threshold``. The distance rule
        compares medians in each class's own reduced coordinates with ``preset="art"`` (as ART does), and class means
        in the activation space otherwise (cluster centres mapped back through the class's PCA).
    size_threshold : float, default 0.35
    seed : int, default 0
    preset : ``"default"`` | ``"art"``
        ``"default"`` adds a separation gate to every rule: a cluster is flagged only when it also stands apart from
        the class's main (largest) cluster, Ashman's D ≥ ``min_separation`` (default 4.5) of the two clusters'
        projections on the line between their centroids (in the PCA coordinates, also when clustering ran on ICA or
        UMAP coordinates) — so a class with no real sub-population (where k-means
        merely cuts one blob in two, D ≈ 2.6–2.8) flags nothing. ``"art"`` reproduces ART 1.20's
        ``ActivationDefence``: PCA to ``n_components`` only when ``d > n_components`` (the raw activations
        otherwise), scikit-learn ``KMeans(n_clusters)`` (its defaults, seeded), rule ``"smaller"`` unless
        ``analysis`` is given, no gate.
    n_clusters : int, default 2
    silhouette_threshold : float, default 0.1 (ART's)
    min_separation : float, default 4.5 (``preset="default"``), 0 with ``preset="art"``.
        Observed on the bundled benchmark sets: clean classes' k-means splits D ≈ 2.7–4.0 (Fashion-MNIST), up to 5.8
        where a clean class has a real sub-population (the digits demo's 1s); BadNets poison D ≈ 5.0 (digits) and 8.6
        (Fashion-MNIST).
    min_spread : float, default 2.0 (``preset="default"``), 0 with ``preset="art"``.
        The heterogeneity check shared with the spectral "auto" rule: a flagged cluster is kept only when its spread
        (trace of its covariance in the class's top-8 PCA coordinates) is at least ``min_spread`` times that of the
        rest of the class. Relabelled poison keeps the variation of its source classes; a class's own sub-style
        (the digits demo's 1s and 9s) is no wider than the rest (ratios 0.5–0.9 there, 3.4 for the poison).
        ``spread_`` gives the ratio per class.
    eps, min_samples, min_cluster_size : density clustering parameters (``eps=None``: DensityClustering's estimate).
    silhouette_rows : int, default 5000
        Rows per class drawn (seeded) for the silhouette: never O(n²) over a whole class.
    fit_rows : int, default 65536
        Rows per class used to fit k-means / ICA / UMAP / density clusterings.
    chunk_rows : int, default 16384

    Scores
    ------
    ``scores_[i] = (1 − share_i) · dist_i / r_main`` for sample i of class c: ``dist_i`` its distance (reduced
    coordinates) to the centroid of c's main cluster, ``r_main`` the RMS distance of the main cluster's members to
    that centroid, ``share_i`` the fraction of c in i's cluster (0 for noise). A member of the main cluster scores
    about ``(1 − share) ≤ 0.5``; a member of a small, distant cluster scores near its distance in main-cluster
    radii. ``threshold_[c]`` is the lowest score among c's flagged samples (+inf when none): flags come from the
    cluster rule, so a far outlier of the main cluster may score above it without being flagged.

    Attributes after :meth:`fit`: ``scores_ [N]``, ``is_poison_ [N]``, ``threshold_ [G]``, ``clusters_ [N]`` (per-class
    cluster ids, -1 noise / unclustered), ``cluster_sizes_`` / ``poison_clusters_`` / ``separation_`` (one array per
    class), ``silhouette_ [G]`` (NaN when not computed), ``counts_ [G]``, ``means_``, ``skipped_classes_``.
    """

    def __init__(
        self,
        n_components: int = 10,
        reduce: str = "pca",
        method: str = "kmeans",
        analysis: str | None = None,
        size_threshold: float = ART_SIZE_THRESHOLD,
        seed: int = 0,
        *,
        preset: str = "default",
        n_clusters: int = 2,
        silhouette_threshold: float = ART_SILHOUETTE_THRESHOLD,
        min_separation: float | None = None,
        min_spread: float | None = None,
        eps: float | None = None,
        min_samples: int = 5,
        min_cluster_size: int | None = None,
        silhouette_rows: int = 5000,
        fit_rows: int = 65536,
        chunk_rows: int = 16384,
    ) -> None:
        if preset not in _PRESETS:
            raise ValueError(f"preset must be one of {_PRESETS}, got {preset!r}")
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if analysis is None:
            analysis = "smaller" if preset == "art" else "relative-size"
        if analysis not in _ANALYSES:
            raise ValueError(f"analysis must be one of {_ANALYSES}, got {analysis!r}")
        if preset == "art" and (method != "kmeans" or reduce == "umap"):
            raise ValueError("preset='art' supports ART's choices only: method='kmeans', reduce='pca' or 'ica'")
        self.n_components = _as_int(n_components, "n_components", 1)
        self.n_clusters = _as_int(n_clusters, "n_clusters", 2)
        if analysis in ("relative-size", "silhouette") and preset == "art" and self.n_clusters != 2:
            raise ValueError(f"analysis={analysis!r} with preset='art' needs n_clusters=2 (as ART)")
        if analysis == "distance" and method == "kmeans" and self.n_clusters != 2:
            raise ValueError("analysis='distance' compares two clusters per class: n_clusters must be 2")
        if not 0 < float(size_threshold) <= 1:
            raise ValueError(f"size_threshold must be in (0, 1], got {size_threshold}")
        if min_separation is not None and not float(min_separation) >= 0:
            raise ValueError(f"min_separation must be >= 0, got {min_separation}")
        if eps is not None and not float(eps) > 0:
            raise ValueError(f"eps must be > 0 or None, got {eps}")
        self.reduce = reduce
        self.method = method
        self.analysis = analysis
        self.size_threshold = float(size_threshold)
        self.seed = _as_int(seed, "seed", 0)
        self.preset = preset
        self.silhouette_threshold = float(silhouette_threshold)
        self.min_separation = float(min_separation if min_separation is not None else (0.0 if preset == "art" else 4.5))
        if min_spread is not None and not float(min_spread) >= 0:
            raise ValueError(f"min_spread must be >= 0, got {min_spread}")
        self.min_spread = float(min_spread if min_spread is not None else (0.0 if preset == "art" else 2.0))
        self.eps = None if eps is None else float(eps)
        self.min_samples = _as_int(min_samples, "min_samples", 1)
        self.min_cluster_size = None if min_cluster_size is None else _as_int(min_cluster_size, "min_cluster_size", 2)
        self.silhouette_rows = _as_int(silhouette_rows, "silhouette_rows", 2)
        self.fit_rows = _as_int(fit_rows, "fit_rows", 2)
        self.chunk_rows = _as_int(chunk_rows, "chunk_rows", 1)

    # -- fitting ------------------------------------------------------------------------------------------------------

    def fit(self, source: Any, labels: Any, *, n_classes: int | None = None) -> ActivationClustering:
        """Two passes over ``source`` (activations ``[N, d]``: array, tensor, ``.npy`` path or shard folder) for the
        per-class PCA, then clustering class by class. ``labels`` ``[N]`` integer classes. Returns ``self``."""
        t0 = time.perf_counter()
        pr = project_by_class(source, labels, n_classes, self.n_components, self.chunk_rows, clamp=True)
        self._fit_projected(pr)
        self.seconds_ = time.perf_counter() - t0
        return self

    def _class_coordinates(self, pr: Projected, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(sample indices, PCA coordinates, the coordinates to cluster)`` of class ``c``."""
        k = int(min(pr.n_components[c], self.n_components))  # a shared scan may carry more directions
        idx, z = pr.class_block(c, k)
        if not np.isfinite(z).all():
            raise ValueError(f"activations of class {c} contain NaN or infinite values")
        d = pr.directions.shape[1]
        if self.preset == "art" and d <= self.n_components:
            # ART clusters the raw activations when they have no more than n_components features.
            return idx, z, z @ pr.directions[c, :, :k].T + pr.means[c]
        if self.reduce == "ica":
            return idx, z, self._ica(z)
        if self.reduce == "umap":
            return idx, z, self._umap(z)
        return idx, z, z

    def _fit_rows_of(self, z: np.ndarray) -> np.ndarray:
        return z if len(z) <= self.fit_rows else z[np.linspace(0, len(z) - 1, self.fit_rows).astype(np.int64)]

    def _ica(self, z: np.ndarray) -> np.ndarray:
        try:
            from sklearn.decomposition import FastICA
            from sklearn.exceptions import ConvergenceWarning
        except ImportError as exc:
            raise ImportError("reduce='ica' needs scikit-learn: pip install scikit-learn") from exc
        if z.shape[1] < 1 or np.ptp(z, axis=0).max() == 0:
            return z
        ica = FastICA(n_components=z.shape[1], whiten="unit-variance", max_iter=1000, tol=0.005, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported as ica_iterations instead
            ica.fit(self._fit_rows_of(z))
        self._ica_iters.append(int(ica.n_iter_))
        return ica.transform(z)

    def _umap(self, z: np.ndarray) -> np.ndarray:
        try:
            import umap
        except ImportError as exc:
            raise ImportError("reduce='umap' needs the optional package 'umap-learn': pip install umap-learn") from exc
        reducer = umap.UMAP(n_components=min(2, z.shape[1]), random_state=self.seed)
        reducer.fit(self._fit_rows_of(z))
        return np.asarray(reducer.transform(z), dtype=np.float64)

    def _cluster(self, z: np.ndarray) -> np.ndarray:
        if self.method != "kmeans":
            return _density(self.method, z, self)
        if self.preset == "art":
            return _kmeans_sklearn(z, self.n_clusters, self.seed)
        try:
            import faiss  # noqa: F401
        except ImportError:
            self._backend = "numpy"
            zf = self._fit_rows_of(z)
            lab = _kmeans_numpy(zf, self.n_clusters, self.seed)
            if len(zf) == len(z):
                return lab
            centres = np.full((self.n_clusters, z.shape[1]), np.inf)
            for j in np.unique(lab):
                centres[j] = zf[lab == j].mean(axis=0)
            return _nearest(centres, z)
        self._backend = "faiss"
        return _kmeans_faiss(z, self.n_clusters, self.seed, self.fit_rows)

    def _fit_class(self, pr: Projected, c: int) -> _ClassFit:
        idx, z_pca, z = self._class_coordinates(pr, c)
        # All rows identical: one cluster, nothing to split.
        flat = np.ptp(z, axis=0).max(initial=0.0) == 0
        clusters = np.zeros(len(z), dtype=np.int64) if flat else self._cluster(z)
        # Density methods: renumber the cluster ids to 0..K-1 (sorted), -1 stays noise.
        ids = np.unique(clusters[clusters >= 0])
        if self.method == "kmeans":
            k = self.n_clusters
        else:
            remap = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, dtype=np.int64)
            remap[ids] = np.arange(len(ids))
            clusters = np.where(clusters >= 0, remap[np.maximum(clusters, 0)], -1)
            k = len(ids)
        sizes = np.bincount(clusters[clusters >= 0], minlength=k)
        if k == 0 or sizes.max() == 0:
            return _ClassFit(idx, clusters, sizes, -1, np.zeros(k), np.nan, np.zeros((k, z.shape[1])),
                             np.median(z, axis=0))  # fmt: skip
        main = int(np.argmax(sizes))
        # The gate is measured in the PCA coordinates whatever the clustering ran on (ICA's unit-variance whitening
        # or UMAP's embedding would change the scale it was calibrated on).
        sep = _separation(z_pca, clusters, k, main)
        sil = np.nan
        if self.analysis == "silhouette":
            sil = sampled_silhouette(z, clusters, self.silhouette_rows, self.seed)
        medians = np.full((k, z.shape[1]), np.nan)
        for j in np.flatnonzero(sizes):
            medians[j] = np.median(z[clusters == j], axis=0)
        fit = _ClassFit(idx, clusters, sizes, main, sep, sil, medians, np.median(z, axis=0))
        # Scores: distance to the main centroid in main-cluster radii, times (1 − the sample's cluster share).
        in_main = clusters == main
        c_main = z[in_main].mean(axis=0)
        dist = np.sqrt(np.maximum(((z - c_main) ** 2).sum(axis=1), 0.0))
        r_main = float(np.sqrt(np.mean(dist[in_main] ** 2)))
        share = np.where(clusters >= 0, sizes[np.maximum(clusters, 0)] / len(idx), 0.0)
        fit.extra["scores"] = (1.0 - share) * dist / (r_main if r_main > 0 else 1.0)
        if self.analysis == "distance" and self.preset != "art" and self.reduce == "pca":
            # Cluster centres in the activation space: class mean + the cluster's mean mapped back through the PCA.
            kk = z.shape[1]
            means = np.array([z[clusters == j].mean(axis=0) if sizes[j] else np.full(kk, np.nan) for j in range(k)])
            fit.extra["centres"] = means @ pr.directions[c, :, :kk].T + pr.means[c]
        return fit

    def _fit_projected(self, pr: Projected) -> None:
        y, g = pr.labels, pr.n_classes
        n = len(y)
        self._ica_iters: list[int] = []
        self._backend = "sklearn" if self.preset == "art" else None
        need = self.n_clusters if self.method == "kmeans" else max(2, self.min_samples)
        fits: dict[int, _ClassFit] = {}
        skipped = []
        for c in np.flatnonzero(pr.counts):
            if pr.counts[c] < need or pr.n_components[c] < 1:
                skipped.append(int(c))
                continue
            fits[int(c)] = self._fit_class(pr, int(c))

        poison = self._decide(fits, pr)
        scores = np.zeros(n)
        is_poison = np.zeros(n, dtype=bool)
        clusters = np.full(n, -1, dtype=np.int64)
        threshold = np.full(g, np.inf)
        self.cluster_sizes_ = [np.zeros(0, dtype=np.int64) for _ in range(g)]
        self.poison_clusters_ = [np.zeros(0, dtype=bool) for _ in range(g)]
        self.separation_ = [np.zeros(0) for _ in range(g)]
        self.silhouette_ = np.full(g, np.nan)
        for c, fit in fits.items():
            clusters[fit.idx] = fit.clusters
            scores[fit.idx] = fit.extra.get("scores", 0.0)
            flagged = (fit.clusters >= 0) & poison[c][np.maximum(fit.clusters, 0)] if len(poison[c]) else None
            if flagged is not None:
                is_poison[fit.idx] = flagged
                if flagged.any():
                    threshold[c] = float(scores[fit.idx][flagged].min())
            self.cluster_sizes_[c] = fit.sizes.astype(np.int64)
            self.poison_clusters_[c] = poison[c]
            self.separation_[c] = fit.separation
            self.silhouette_[c] = fit.silhouette
        self.spread_ = np.full(g, np.nan)
        if self.min_spread > 0 and pr.directions.shape[2] >= 1:
            self.spread_ = spread_gate(pr, is_poison, self.min_spread)
            threshold[np.bincount(y[is_poison], minlength=g) == 0] = np.inf
        self.scores_ = scores
        self.is_poison_ = is_poison
        self.threshold_ = threshold
        self.clusters_ = clusters
        self.labels_ = y
        self.counts_ = pr.counts
        self.means_ = pr.means
        self.skipped_classes_ = skipped
        self.seconds_ = 0.0

    def _decide(self, fits: dict[int, _ClassFit], pr: Projected) -> dict[int, np.ndarray]:
        """Poison clusters per class by the rule, then (preset ``"default"``) the separation gate."""
        out: dict[int, np.ndarray] = {}
        if self.analysis == "distance":
            g = pr.n_classes
            cls = sorted(fits)
            if self.preset == "art" or self.reduce != "pca":
                dims = {fits[c].centre.shape for c in cls}
                # Medians in each class's own coordinates, as ART compares them.
                centres = np.full((g, max((s[0] for s in dims), default=0)), np.nan)
                cc: list[np.ndarray] = [np.full((0, centres.shape[1]), np.nan) for _ in range(g)]
                for c in cls:
                    if fits[c].centre.shape[0] == centres.shape[1]:
                        centres[c] = fits[c].centre
                        cc[c] = fits[c].medians
            else:
                centres = pr.means
                cc = [np.full((0, centres.shape[1]), np.nan) for _ in range(g)]
                for c in cls:
                    cc[c] = fits[c].extra["centres"]
            flags = rule_distance(cc, centres)
            out = {c: flags[c] if len(flags[c]) == len(fits[c].sizes) else np.zeros(len(fits[c].sizes), bool)
                   for c in cls}  # fmt: skip
        for c, fit in fits.items():
            if self.analysis == "smaller":
                out[c] = rule_smaller(fit.sizes)
            elif self.analysis == "relative-size":
                out[c] = rule_relative_size(fit.sizes, self.size_threshold)
            elif self.analysis == "silhouette":
                out[c] = rule_silhouette(fit.sizes, fit.silhouette, self.size_threshold, self.silhouette_threshold)
            if self.min_separation > 0:
                out[c] = out[c] & (fit.separation >= self.min_separation)
            if fit.main >= 0 and self.preset != "art":
                out[c][fit.main] = False  # the largest cluster is the class
        return out

    def report(self) -> dict:
        """Per-class counts (samples, flagged, clusters, flagged clusters) and the parameters, as plain JSON types;
        ``cluster_details`` lists each class's cluster sizes, separations, flags and silhouette."""
        if not hasattr(self, "scores_"):
            raise RuntimeError("call fit() first")
        g = len(self.counts_)
        rep = detector_report(
            self,
            "activation-clustering",
            {
                "n_components": self.n_components,
                "reduce": self.reduce,
                "method": self.method,
                "analysis": self.analysis,
                "size_threshold": self.size_threshold,
                "seed": self.seed,
                "preset": self.preset,
                "n_clusters": self.n_clusters,
                "silhouette_threshold": self.silhouette_threshold,
                "min_separation": self.min_separation,
                "min_spread": self.min_spread,
                "eps": self.eps,
                "min_samples": self.min_samples,
                "min_cluster_size": self.min_cluster_size,
                "kmeans_backend": self._backend if self.method == "kmeans" else None,
            },
            {
                "clusters": np.array([len(s) for s in self.cluster_sizes_]),
                "poison_clusters": np.array([int(p.sum()) for p in self.poison_clusters_]),
                "noise": np.bincount(self.labels_[self.clusters_ < 0], minlength=g),
            },
        )
        rep["cluster_details"] = [
            {
                "class": c,
                "sizes": [int(v) for v in self.cluster_sizes_[c]],
                "separation": [float(v) if np.isfinite(v) else None for v in self.separation_[c]],
                "poison": [bool(v) for v in self.poison_clusters_[c]],
                "silhouette": None if np.isnan(self.silhouette_[c]) else float(self.silhouette_[c]),
            }
            for c in range(g)
        ]
        # A class split into separated groups none of which the rule calls poison (e.g. poison near half of the
        # class, where size cannot tell which half is which): worth a look, not flagged.
        gate = self.min_separation if self.min_separation > 0 else 4.5
        rep["separated_unflagged_classes"] = [
            c
            for c in range(g)
            if len(self.separation_[c]) and not self.poison_clusters_[c].any() and (self.separation_[c] >= gate).any()
        ]
        if self._ica_iters:
            rep["params"]["ica_iterations_max"] = max(self._ica_iters)
        return rep
