"""DensityClustering (DBSCAN on a kd-tree in _core, or on FAISS) against scikit-learn's DBSCAN and the float64
references in _reference.

Partitions are compared with the adjusted Rand index and by their noise sets; with ``label_order="index"`` the
numbering is scikit-learn's, so labels are compared as they are where no distance lies within float32 rounding of
eps (the data below is continuous random, so none does).
"""

from __future__ import annotations

import numpy as np
import pytest
from poisonguard import _core
from poisonguard._reference import _border_labels, _connected_components, _dbscan

faiss = pytest.importorskip("faiss")
sklearn_cluster = pytest.importorskip("sklearn.cluster")
from poisonguard.cluster import DensityClustering  # noqa: E402
from poisonguard.cluster import density as density_mod  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402


def _blobs(seed: int, n: int = 1200, d: int = 4, centers: int = 5, noise: float = 0.1, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    c = rng.uniform(-10, 10, (centers, d))
    m = int(n * (1 - noise))
    x = np.vstack(
        [c[rng.integers(0, centers, m)] + spread * rng.standard_normal((m, d)), rng.uniform(-12, 12, (n - m, d))]
    )
    return x[rng.permutation(n)]


def _sk(x, eps, ms, metric="euclidean"):
    return sklearn_cluster.DBSCAN(eps=eps, min_samples=ms, metric=metric).fit(np.asarray(x, dtype=np.float64))


# -- against scikit-learn ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("eps", "ms"), [(0.3, 3), (0.5, 5), (0.8, 10), (1.5, 25), (3.0, 4), (1.0, 40)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("index", ["kdtree", "flat"])
def test_matches_sklearn(eps, ms, seed, index):
    x = _blobs(seed).astype(np.float32)
    ref = _sk(x, eps, ms)
    dc = DensityClustering(eps=eps, min_samples=ms, label_order="index", index=index).fit(x)
    assert adjusted_rand_score(ref.labels_, dc.labels_) >= 0.99
    np.testing.assert_array_equal(dc.labels_ == -1, ref.labels_ == -1)
    core = np.zeros(len(x), bool)
    core[ref.core_sample_indices_] = True
    np.testing.assert_array_equal(dc.core_sample_mask_, core)
    np.testing.assert_array_equal(dc.labels_, ref.labels_)  # same numbering, same border ties
    assert dc.n_clusters_ == ref.labels_.max() + 1
    assert dc.mode_ == "memory"


@pytest.mark.parametrize("keep", [0, 1 << 25])
def test_both_strategies_match_reference(keep, monkeypatch):
    """The one-pass (pairs kept) and the three-pass (k-NN core test, core index) strategies give DBSCAN."""
    monkeypatch.setattr(density_mod, "_KEEP_PAIRS", keep)
    x = _blobs(3, n=900, d=3)
    for eps, ms in [(0.4, 4), (0.9, 12), (0.2, 1)]:
        lab, core = _dbscan(x, eps, ms)
        dc = DensityClustering(eps=eps, min_samples=ms, label_order="index", index="flat").fit(x)
        np.testing.assert_array_equal(dc.core_sample_mask_, core)
        np.testing.assert_array_equal(dc.labels_, lab)
        assert ("one range pass" in dc.strategy_) == (keep > 0 and ms > 1)


@pytest.mark.parametrize("index", ["kdtree", "flat"])
def test_cosine_matches_sklearn(index):
    x = _blobs(4, n=800, d=6) + 0.1
    ref = _sk(x, 0.02, 5, metric="cosine")
    dc = DensityClustering(eps=0.02, min_samples=5, metric="cosine", label_order="index", index=index).fit(x)
    assert adjusted_rand_score(ref.labels_, dc.labels_) >= 0.99
    np.testing.assert_array_equal(dc.labels_ == -1, ref.labels_ == -1)


def test_ivf_agrees_with_flat():
    x = _blobs(5, n=6000, d=5, centers=8, spread=0.6).astype(np.float32)
    flat = DensityClustering(eps=0.5, min_samples=8, index="flat").fit(x)
    ivf = DensityClustering(eps=0.5, min_samples=8, index="ivf").fit(x)
    assert ivf.index_["kind"] == "ivf" and not ivf.index_["exact"]
    assert adjusted_rand_score(flat.labels_, ivf.labels_) >= 0.99
    assert np.mean((flat.labels_ == -1) != (ivf.labels_ == -1)) <= 0.01
    assert ivf.report()["index"]["nprobe"] >= 1


def test_size_order_and_report():
    x = _blobs(6)
    dc = DensityClustering(eps=0.5, min_samples=5).fit(x)
    sizes = np.bincount(dc.labels_[dc.labels_ >= 0])
    assert (np.diff(sizes) <= 0).all()
    ref = _sk(x, 0.5, 5)
    assert adjusted_rand_score(ref.labels_, dc.labels_) == pytest.approx(1.0)
    rep = dc.report()
    assert rep["cluster_sizes"] == sizes.tolist()
    assert rep["n_noise"] == int((dc.labels_ == -1).sum())
    assert rep["eps"] == 0.5 and rep["eps_source"] == "given"
    assert rep["mode"] == "in memory" and rep["index"]["kind"] == "kdtree" and rep["index"]["exact"]
    assert set(rep["stage_seconds"]) >= {"tree", "core", "join_recorded", "join_search", "border"}
    assert rep["n_core"] == int(dc.core_sample_mask_.sum())
    np.testing.assert_array_equal(DensityClustering(eps=0.5, min_samples=5).fit_predict(x), dc.labels_)


# -- kd-tree kernel ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leaf", [1, 3, 16, 128, 5000])
@pytest.mark.parametrize(("d", "eps", "ms"), [(1, 0.05, 4), (2, 0.4, 6), (3, 0.6, 1), (5, 1.2, 33), (12, 2.5, 8)])
def test_kdtree_kernel_vs_reference(leaf, d, eps, ms):
    """Every leaf size (one row per leaf to one leaf of all), min_samples above and below the recorded-neighbour cap
    (32), float64 reference by brute force."""
    x = _blobs(20 + d, n=700, d=d, spread=0.3 * np.sqrt(d)).astype(np.float32)
    lab, core, k, seconds = _core.dbscan_kdtree(x, eps * eps, ms, leaf)
    ref_lab, ref_core = _dbscan(x, eps, ms)
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_array_equal(lab, ref_lab)
    assert k == ref_lab.max() + 1 and seconds.shape == (5,) and (seconds >= 0).all()


@pytest.mark.parametrize("ms", [4, 40])
def test_kdtree_threaded_matches_sklearn(ms):
    """Enough rows for the threaded passes (the join shares its union-find between threads): scikit-learn's labels,
    core set and numbering exactly."""
    x = _blobs(40, n=30000, d=3, centers=12, spread=0.6, noise=0.2).astype(np.float32)
    ref = _sk(x, 0.35, ms)
    lab, core, k, _ = _core.dbscan_kdtree(x, 0.35**2, ms)
    ref_core = np.zeros(len(x), bool)
    ref_core[ref.core_sample_indices_] = True
    np.testing.assert_array_equal(core, ref_core)
    np.testing.assert_array_equal(lab, ref.labels_)
    assert k == ref.labels_.max() + 1 > 5


def test_kdtree_kernel_degenerate_and_strided():
    # duplicates everywhere: three points repeated, plus a far one
    base = np.array([[0, 0], [0, 0.5], [5, 5], [40, 40]], np.float32)
    x = np.repeat(base, [30, 30, 10, 1], axis=0)[np.random.default_rng(0).permutation(71)]
    for eps, ms in [(0.0, 5), (0.5, 31), (0.49, 31), (1.0, 11), (100.0, 72), (100.0, 71)]:
        lab, core, _, _ = _core.dbscan_kdtree(x, eps * eps, ms, 4)
        ref_lab, ref_core = _dbscan(x, eps, ms)
        np.testing.assert_array_equal(core, ref_core)
        np.testing.assert_array_equal(lab, ref_lab)
    # a row-strided view (every other row of a wider array) and a column slice are read in place
    wide = _blobs(30, n=400, d=6).astype(np.float32)
    for view in (wide[::2], wide[:, :4], wide[1::3, 2:5]):
        lab, core, _, _ = _core.dbscan_kdtree(view, 0.8**2, 5)
        ref_lab, ref_core = _dbscan(np.ascontiguousarray(view), 0.8, 5)
        np.testing.assert_array_equal(lab, ref_lab)
        np.testing.assert_array_equal(core, ref_core)
    # empty, one row
    lab, core, k, _ = _core.dbscan_kdtree(np.zeros((0, 3), np.float32), 1.0, 2)
    assert lab.shape == (0,) and core.shape == (0,) and k == 0
    lab, core, k, _ = _core.dbscan_kdtree(np.ones((1, 3), np.float32), 1.0, 1)
    assert lab.tolist() == [0] and core.tolist() == [True] and k == 1


def test_kdtree_kernel_distance_at_eps():
    """Rows at exactly eps are neighbours (<=, scikit-learn's test), also where float32 sums would round across."""
    x = np.array([[0.0, 0.0], [0.3, 0.4], [0.6, 0.8], [0.1, 0.1], [0.31, 0.41]], np.float32)
    x64 = x.astype(np.float64)
    d2 = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    for eps2 in (d2[0, 1], d2[1, 2], d2[0, 4]):
        for e2 in (eps2, np.nextafter(eps2, 0), np.nextafter(eps2, 1)):
            _, core, _, _ = _core.dbscan_kdtree(x, float(e2), 3)
            np.testing.assert_array_equal(core, (d2 <= e2).sum(1) >= 3)


def test_kdtree_kernel_bad_input():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(TypeError, match="float32"):
        _core.dbscan_kdtree(x.astype(np.float64), 1.0, 2)
    with pytest.raises(ValueError, match="2-D"):
        _core.dbscan_kdtree(x[:, 0], 1.0, 2)
    with pytest.raises(ValueError, match="eps"):
        _core.dbscan_kdtree(x, -1.0, 2)
    with pytest.raises(ValueError, match="eps"):
        _core.dbscan_kdtree(x, float("nan"), 2)
    with pytest.raises(ValueError, match="min_samples"):
        _core.dbscan_kdtree(x, 1.0, 0)
    with pytest.raises(ValueError, match="leaf_size"):
        _core.dbscan_kdtree(x, 1.0, 2, 0)
    with pytest.raises(ValueError, match="column"):
        _core.dbscan_kdtree(np.zeros((5, 0), np.float32), 1.0, 2)
    with pytest.raises(ValueError, match="column stride"):
        _core.dbscan_kdtree(np.asfortranarray(np.zeros((5, 3), np.float32)), 1.0, 2)


def test_kdtree_without_faiss(monkeypatch):
    """The kd-tree path needs no FAISS; a FAISS index (or eps=None) names the package to install."""
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)
    x = _blobs(31, n=500, d=3).astype(np.float32)
    dc = DensityClustering(eps=0.6, min_samples=5, label_order="index").fit(x)
    np.testing.assert_array_equal(dc.labels_, _dbscan(x, 0.6, 5)[0])
    for kw in ({"index": "flat"}, {"index": "ivf"}, {"eps": None}):
        with pytest.raises(ImportError, match="pip install faiss-cpu"):
            DensityClustering(**{"eps": 0.6, **kw}).fit(x)


# -- union-find kernel ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 1000])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0, 3.0])
def test_union_find_vs_scipy(n, density):
    rng = np.random.default_rng(n * 10 + int(density * 10))
    ne = int(density * n)
    edges = rng.integers(0, max(n, 1), (ne, 2)) if n else np.zeros((0, 2), np.int64)
    if n and ne:
        edges = np.vstack([edges, edges[: ne // 3], np.repeat(edges[:3, :1], 2, axis=1)])  # duplicates, self-loops
    edges = np.ascontiguousarray(edges, dtype=np.int64)
    parent, size = np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    merged = _core.uf_union_edges(parent, size, edges)
    labels, count = _core.uf_components(parent, size, None)
    ref = _connected_components(n, edges)
    np.testing.assert_array_equal(labels, ref)
    assert count == (ref.max() + 1 if n else 0)
    assert merged == n - count


def test_union_block_and_mask_vs_reference():
    rng = np.random.default_rng(7)
    n = 300
    core = (rng.random(n) < 0.7).astype(np.uint8)
    nbrs = [rng.integers(-1, n, rng.integers(0, 6)) for _ in range(n)]  # -1 = FAISS's "no result"
    lims = np.concatenate([[0], np.cumsum([len(v) for v in nbrs])]).astype(np.uint64)
    ids = np.concatenate(nbrs).astype(np.int64)
    rows = np.arange(n, dtype=np.int64)
    parent, size = np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    for s in range(0, n, 64):  # in blocks, as from successive range searches
        e = min(n, s + 64)
        _core.uf_union_block(parent, size, (lims[s : e + 1] - lims[s]).copy(), ids[lims[s] : lims[e]], rows[s:e], core)
    labels, _ = _core.uf_components(parent, size, core)
    edges = [(r, j) for r in range(n) for j in nbrs[r] if j >= 0 and core[r] and core[j]]
    ci = np.flatnonzero(core)
    pos = np.full(n, -1)
    pos[ci] = np.arange(len(ci))
    ref_core = _connected_components(len(ci), np.array([(pos[a], pos[b]) for a, b in edges], dtype=np.int64))
    ref = np.full(n, -1, dtype=np.int64)
    ref[ci] = ref_core
    np.testing.assert_array_equal(labels, ref)

    out = labels.copy()
    _core.border_labels(lims, ids, rows, labels, out)
    expect = labels.copy()
    border = _border_labels(n, [v[v >= 0] for v in nbrs], labels)
    expect[labels < 0] = border[labels < 0]
    np.testing.assert_array_equal(out, expect)


def test_kernel_bad_input():
    parent, size = np.arange(4, dtype=np.int64), np.ones(4, dtype=np.int64)
    with pytest.raises(ValueError, match="outside"):
        _core.uf_union_edges(parent, size, np.array([[0, 4]], dtype=np.int64))
    with pytest.raises(TypeError, match="int64"):
        _core.uf_union_edges(parent, size, np.array([[0, 1]], dtype=np.int32))
    with pytest.raises(ValueError, match="lims"):
        _core.uf_union_block(
            parent, size, np.array([0, 2, 1], np.int64), np.zeros(2, np.int64), np.arange(2), np.ones(4, np.uint8)
        )
    with pytest.raises(ValueError, match="ids"):
        _core.border_labels(
            np.array([0, 1], np.int64), np.array([9], np.int64), np.zeros(1, np.int64), np.zeros(4, np.int64), parent
        )


# -- inputs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["float16", "float64", "strided", "transposed", "torch-bfloat16", "npy"])
def test_input_kinds(kind, tmp_path):
    base = _blobs(8, n=700, d=3).astype(np.float32)
    if kind == "float16":
        x = base.astype(np.float16)
    elif kind == "float64":
        x = base.astype(np.float64)
    elif kind == "strided":
        x = np.repeat(base, 2, axis=1)[::1, ::2]
    elif kind == "transposed":
        x = np.asfortranarray(base)
    elif kind == "torch-bfloat16":
        torch = pytest.importorskip("torch")
        x = torch.from_numpy(base).to(torch.bfloat16)
    else:
        np.save(tmp_path / "x.npy", base)
        x = str(tmp_path / "x.npy")
    values = (
        base
        if kind in ("strided", "transposed", "npy")
        else np.asarray(
            x.float().numpy() if hasattr(x, "float") and not isinstance(x, np.ndarray) else x, dtype=np.float32
        )
    )
    lab, _ = _dbscan(values.astype(np.float32), 0.6, 5)
    dc = DensityClustering(eps=0.6, min_samples=5, label_order="index", chunk_rows=128).fit(x)
    assert adjusted_rand_score(lab, dc.labels_) >= 0.99
    np.testing.assert_array_equal(dc.labels_ == -1, lab == -1)


@pytest.mark.parametrize("index", ["kdtree", "flat"])
def test_degenerate_inputs(index, monkeypatch):
    monkeypatch.setattr(density_mod, "_KDTREE_MAX_DIM", 32 if index == "kdtree" else 0)  # what "auto" picks
    # n = 0
    dc = DensityClustering(eps=1.0).fit(np.zeros((0, 3), np.float32))
    assert dc.labels_.shape == (0,) and dc.n_clusters_ == 0 and dc.report()["n_noise"] == 0
    # one sample: noise unless min_samples = 1
    assert DensityClustering(eps=1.0, min_samples=2).fit_predict(np.ones((1, 2))).tolist() == [-1]
    assert DensityClustering(eps=1.0, min_samples=1).fit_predict(np.ones((1, 2))).tolist() == [0]
    # identical rows: one cluster of all, or all noise when min_samples exceeds n
    same = np.full((50, 4), 3.5, np.float32)
    assert DensityClustering(eps=0.0, min_samples=50).fit_predict(same).tolist() == [0] * 50
    assert DensityClustering(eps=0.1, min_samples=51).fit_predict(same).tolist() == [-1] * 50
    # d = 1
    x1 = np.concatenate([np.arange(20) * 0.1, 10 + np.arange(30) * 0.1, [50.0]])[:, None]
    lab = DensityClustering(eps=0.15, min_samples=3).fit_predict(x1)
    assert lab[:20].tolist() == [1] * 20 and lab[20:50].tolist() == [0] * 30 and lab[50] == -1
    # eps giving one cluster / all noise; min_samples = 1: every row core, clusters = components
    x = _blobs(9, n=300, d=2)
    assert set(DensityClustering(eps=100.0, min_samples=5).fit_predict(x).tolist()) == {0}
    assert set(DensityClustering(eps=1e-6, min_samples=2).fit_predict(x).tolist()) == {-1}
    lab1 = DensityClustering(eps=0.3, min_samples=1, label_order="index").fit(x)
    assert lab1.core_sample_mask_.all() and (lab1.labels_ >= 0).all()
    np.testing.assert_array_equal(lab1.labels_, _dbscan(x.astype(np.float32), 0.3, 1)[0])


def test_eps_none_picks_knee():
    """Blobs of spread 0.2 plus sparse noise: the knee lies between the blobs' k-distances and the noise's."""
    x = _blobs(10, n=3000, d=3, centers=4, spread=0.2, noise=0.05).astype(np.float32)
    dc = DensityClustering(eps=None, min_samples=6).fit(x)
    kd = dc.kdist_
    assert kd.shape == (3000,) and (np.diff(kd) >= 0).all()
    assert np.quantile(kd, 0.5) < dc.eps_ < np.quantile(kd, 0.99)
    assert 0.05 < dc.eps_ < 1.0
    assert "knee" in dc.report()["eps_source"]
    ref = _sk(x, dc.eps_, 6)
    assert adjusted_rand_score(ref.labels_, dc.labels_) >= 0.99
    assert dc.n_clusters_ == 4


def test_bad_input():
    x = _blobs(11, n=100, d=2)
    with pytest.raises(ValueError, match="eps"):
        DensityClustering(eps=-1.0).fit(x)
    with pytest.raises(ValueError, match="min_samples"):
        DensityClustering(eps=1.0, min_samples=0).fit(x)
    with pytest.raises(TypeError, match="min_samples"):
        DensityClustering(eps=1.0, min_samples=2.5).fit(x)
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\[7\]"):
        DensityClustering(eps=1.0).fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        DensityClustering(eps=1.0).fit(x[:, 0])
    with pytest.raises(ValueError, match="2-D"):
        DensityClustering(eps=1.0).fit(x[None])
    with pytest.raises(TypeError, match="floating"):
        DensityClustering(eps=1.0).fit(x.astype(np.int64))
    with pytest.raises(TypeError):
        DensityClustering(eps=1.0).fit([[1.0, 2.0]])
    with pytest.raises(ValueError, match="metric"):
        DensityClustering(eps=1.0, metric="l1").fit(x)
    with pytest.raises(ValueError, match="non-zero rows"):
        DensityClustering(eps=0.1, metric="cosine").fit(np.vstack([x, np.zeros((1, 2))]))
    with pytest.raises(ValueError, match="features"):
        DensityClustering(eps=1.0).fit(np.zeros((3, 0)))
    with pytest.raises(RuntimeError, match="fit"):
        DensityClustering(eps=1.0).report()


def test_missing_faiss_message(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        DensityClustering(eps=1.0, index="flat").fit(np.zeros((3, 2)))


# -- out of core ------------------------------------------------------------------------------------------------------
def _separated(seed: int, n: int, d: int):
    """Tight, well separated blobs and 5 % uniform noise: DBSCAN's answer is stable there."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-20, 20, (6, d))
    m = int(n * 0.95)
    x = np.vstack([c[rng.integers(0, 6, m)] + 0.5 * rng.standard_normal((m, d)), rng.uniform(-22, 22, (n - m, d))])
    return x[rng.permutation(n)].astype(np.float32)


@pytest.mark.parametrize("d", [3, 8])
def test_stream_agrees_with_memory(d, tmp_path):
    x = _separated(12, 4000, d)
    path = tmp_path / "x.npy"
    np.save(path, x)
    eps = 0.6 if d == 3 else 1.4
    mem = DensityClustering(eps=eps, min_samples=8, mode="memory").fit(x)
    budget = 4096  # bytes: the in-memory estimate exceeds it, so "auto" streams, and the labels go to a file
    st = DensityClustering(eps=eps, min_samples=8, memory_budget=budget, chunk_rows=1000).fit(str(path))
    assert st.mode_ == "stream" and st.core_sample_mask_ is None
    assert isinstance(st.labels_, np.memmap) and st.labels_.dtype == np.int64 and st.labels_.shape == (4000,)
    assert adjusted_rand_score(mem.labels_, np.asarray(st.labels_)) >= 0.95
    assert abs(st.n_noise_ - mem.n_noise_) <= 0.02 * len(x)
    rep = st.report()
    assert rep["mode"] == "out of core" and rep["index"]["exact"] is False
    assert rep["stream"]["labels_storage"] == "temporary file" and rep["stream"]["passes_over_source"] == 2
    sizes = np.bincount(np.asarray(st.labels_)[np.asarray(st.labels_) >= 0])
    assert rep["cluster_sizes"] == sizes.tolist() and (np.diff(sizes) <= 0).all()
    # deterministic for a seed; an in-memory array streamed gives the same labels
    again = DensityClustering(eps=eps, min_samples=8, mode="stream", chunk_rows=777).fit(x)
    np.testing.assert_array_equal(np.asarray(st.labels_), again.labels_)
    assert rep["stream"]["labels_storage"] != again.report()["stream"]["labels_storage"]


def test_stream_eps_none_and_edges(tmp_path):
    x = _separated(13, 3000, 4)
    st = DensityClustering(eps=None, min_samples=8, mode="stream").fit(x)
    mem = DensityClustering(eps=None, min_samples=8, mode="memory").fit(x)
    assert 0.5 * mem.eps_ < st.eps_ < 2.0 * mem.eps_
    assert "sample" in st.report()["eps_source"]
    assert adjusted_rand_score(mem.labels_, st.labels_) >= 0.9
    ivf = DensityClustering(eps=mem.eps_, min_samples=8, mode="stream", n_cells=1100).fit(x)  # IVF assignment
    assert ivf.report()["stream"]["n_cells"] == 1100
    assert adjusted_rand_score(mem.labels_, ivf.labels_) >= 0.95
    empty = DensityClustering(eps=1.0, mode="stream").fit(np.zeros((0, 4), np.float32))
    assert empty.labels_.shape == (0,) and empty.n_clusters_ == 0
    bad = x.copy()
    bad[2345, 2] = np.inf
    with pytest.raises(ValueError, match=r"non-finite.*2345"):
        DensityClustering(eps=1.0, mode="stream", chunk_rows=1000, sample_rows=10).fit(bad)
    torch = pytest.importorskip("torch")
    t = DensityClustering(eps=1.0, min_samples=8, mode="stream").fit(torch.from_numpy(x).to(torch.float64))
    np.testing.assert_array_equal(t.labels_, DensityClustering(eps=1.0, min_samples=8, mode="stream").fit(x).labels_)
