"""ActivationClustering: ART's four cluster rules against plain references (and ART itself when installed), the
clusterings against scikit-learn, planted clusters, clean classes, degenerate and bad inputs."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from poisonguard import ActivationClustering, _reference
from poisonguard.detect import clustering as ac

sklearn = pytest.importorskip("sklearn")
from sklearn.cluster import HDBSCAN, KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import adjusted_rand_score, silhouette_score  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402


def _classes(rng, n=3000, d=16, g=3, sub=None, spread=6.0, wide=1.0):
    """``g`` Gaussian classes; ``sub = (class, n_rows, shift)`` moves ``n_rows`` of that class by ``shift`` along a
    random direction (a planted sub-cluster), their spread ``wide`` times the class's (relabelled poison keeps the
    variation of its source classes; ``wide=1`` makes a sub-style of the class). Returns (x, y, planted indices)."""
    y = rng.integers(0, g, n)
    scale = 0.5 + rng.random(d)  # anisotropic: PCA has a preferred order
    x = rng.standard_normal((n, d)) * scale + spread * rng.standard_normal((g, d))[y]
    planted = np.zeros(0, dtype=np.int64)
    if sub is not None:
        c, m, shift = sub
        planted = np.sort(rng.choice(np.flatnonzero(y == c), m, replace=False))
        u = rng.standard_normal(d)
        centre = x[y == c].mean(axis=0)
        x[planted] = centre + (x[planted] - centre) * wide + shift * u / np.linalg.norm(u)
    return x, y, planted


# -- the rules --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_size_rules_match_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(5, 400))
        k = int(rng.integers(2, 5))
        share = rng.dirichlet(np.ones(k) * rng.uniform(0.3, 3))
        clusters = rng.choice(k, n, p=share)
        clusters[:k] = np.arange(k)  # every cluster present
        sizes = np.bincount(clusters, minlength=k)
        np.testing.assert_array_equal(ac.rule_smaller(sizes)[clusters], _reference._cluster_smaller(clusters))
        for t in (0.1, 0.35, 0.5):
            np.testing.assert_array_equal(
                ac.rule_relative_size(sizes, t)[clusters], _reference._cluster_relative_size(clusters, t)
            )


def test_relative_size_rounds_like_art():
    # 0.345 rounds to 0.34 (< 0.35: poison); 0.355 rounds to 0.36 (clean).
    assert ac.rule_relative_size(np.array([345, 655]), 0.35).tolist() == [True, False]
    assert ac.rule_relative_size(np.array([355, 645]), 0.35).tolist() == [False, False]
    assert ac.rule_smaller(np.array([5, 5])).tolist() == [True, False]  # ties: the first


@pytest.mark.parametrize("seed", range(3))
def test_silhouette_matches_reference_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((150, 4))
    lab = (z[:, 0] > 0.3).astype(np.int64)
    lab[:3] = 2  # a small third cluster
    lab[3] = 3  # a singleton: silhouette 0
    ref = _reference._silhouette(z, lab)
    assert ac.sampled_silhouette(z, lab, max_rows=1000) == pytest.approx(ref, abs=1e-8)  # distances via the Gram form
    assert ref == pytest.approx(silhouette_score(z, lab), abs=1e-12)
    # noise (-1) is left out
    lab2 = lab.copy()
    lab2[10:20] = -1
    keep = lab2 >= 0
    assert ac.sampled_silhouette(z, lab2, 1000) == pytest.approx(_reference._silhouette(z[keep], lab2[keep]), abs=1e-8)
    # the sample: close to the full value, deterministic for a seed
    zs = rng.standard_normal((3000, 3))
    ls = (zs[:, 0] > 0).astype(np.int64)
    full = silhouette_score(zs, ls)
    a = ac.sampled_silhouette(zs, ls, max_rows=800, seed=1)
    assert a == ac.sampled_silhouette(zs, ls, max_rows=800, seed=1)
    assert abs(a - full) < 0.03


def test_silhouette_rule_matches_reference():
    rng = np.random.default_rng(5)
    z = np.concatenate([rng.standard_normal((90, 3)), rng.standard_normal((20, 3)) + np.array([6.0, 0, 0])])
    lab = np.r_[np.zeros(90, int), np.ones(20, int)]
    sizes = np.bincount(lab)
    for sil_t in (0.1, 0.9):
        got = ac.rule_silhouette(sizes, ac.sampled_silhouette(z, lab, 1000), 0.35, sil_t)[lab]
        np.testing.assert_array_equal(got, _reference._cluster_silhouette(lab, z, 0.35, sil_t))
    assert _reference._cluster_silhouette(lab, z, 0.35, 0.1).sum() == 20
    assert _reference._cluster_silhouette(lab, z, 0.35, 0.9).sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_distance_rule_matches_reference(seed):
    rng = np.random.default_rng(seed)
    g, k = 4, 3
    clusters, reduced = [], []
    for _ in range(g):
        n = int(rng.integers(10, 60))
        cl = rng.integers(0, 2, n)
        cl[:2] = [0, 1]
        clusters.append(cl)
        reduced.append(rng.standard_normal((n, k)) * 2 + rng.standard_normal(k) * 3)
    centres = np.array([np.median(r, axis=0) for r in reduced])
    cc = [np.array([np.median(r[cl == j], axis=0) for j in (0, 1)]) for cl, r in zip(clusters, reduced)]
    got = ac.rule_distance(cc, centres)
    want = _reference._cluster_distance(clusters, reduced)
    for c in range(g):
        np.testing.assert_array_equal(got[c][clusters[c]], want[c])


@pytest.mark.skipif(importlib.util.find_spec("art") is None, reason="ART is not installed")
def test_rules_match_art_analyzer():
    from art.defences.detector.poison.clustering_analyzer import ClusteringAnalyzer

    rng = np.random.default_rng(0)
    clusters, reduced = [], []
    for c in range(3):
        n = 80 + 10 * c
        cl = (rng.random(n) < 0.2 + 0.05 * c).astype(np.int64)  # a small cluster 1 in every class
        cl[:2] = [0, 1]
        clusters.append(cl)
        reduced.append(rng.standard_normal((n, 3)) + 2 * cl[:, None] + c)
    an = ClusteringAnalyzer()
    art_small = an.analyze_by_size(clusters)[0]
    art_rel = an.analyze_by_relative_size(clusters)[0]  # runs under numpy >= 2.2 only when every class is flagged
    art_dist = an.analyze_by_distance(clusters, reduced)[0]
    cc = [np.array([np.median(r[cl == j], axis=0) for j in (0, 1)]) for cl, r in zip(clusters, reduced)]
    dist = ac.rule_distance(cc, np.array([np.median(r, axis=0) for r in reduced]))
    for c, cl in enumerate(clusters):
        sizes = np.bincount(cl)
        np.testing.assert_array_equal(ac.rule_smaller(sizes)[cl], np.asarray(art_small[c], float) == 0)
        np.testing.assert_array_equal(ac.rule_relative_size(sizes)[cl], np.asarray(art_rel[c], float) == 0)
        np.testing.assert_array_equal(dist[c][cl], np.asarray(art_dist[c], float) == 0)


# -- clusterings against scikit-learn -------------------------------------------------------------------------------


def _pca_by_class(x, y, c, k):
    return PCA(n_components=k).fit_transform(x[y == c])


def test_kmeans_agrees_with_sklearn():
    rng = np.random.default_rng(1)
    x, y, _ = _classes(rng, sub=(1, 300, 12.0))
    det = ActivationClustering(n_components=5).fit(x, y)
    ari = []
    for c in range(3):
        with threadpool_limits(1):  # OpenMP workers on a busy machine: seconds instead of milliseconds
            ref = KMeans(2, n_init=10, random_state=0).fit_predict(_pca_by_class(x, y, c, 5))
        ari.append(adjusted_rand_score(det.clusters_[y == c], ref))
    assert ari[1] == pytest.approx(1.0)  # the planted split: identical
    assert min(ari) > 0.9, ari  # a blob cut in two: the same cut up to the boundary rows


def test_kmeans_numpy_fallback_agrees_with_faiss(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    x, y, _ = _classes(rng, sub=(0, 200, 12.0))
    with_faiss = ActivationClustering().fit(x, y)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    without = ActivationClustering().fit(x, y)
    assert without.report()["params"]["kmeans_backend"] == "numpy"
    assert with_faiss.report()["params"]["kmeans_backend"] == "faiss"
    assert adjusted_rand_score(with_faiss.clusters_[y == 0], without.clusters_[y == 0]) == pytest.approx(1.0)
    np.testing.assert_array_equal(with_faiss.is_poison_, without.is_poison_)


def test_numpy_kmeans_fit_rows_assigns_everything(monkeypatch):
    rng = np.random.default_rng(3)
    x, y, planted = _classes(rng, n=2000, g=1, sub=(0, 150, 12.0))
    monkeypatch.setitem(sys.modules, "faiss", None)
    det = ActivationClustering(fit_rows=300, min_spread=0).fit(x, y)
    assert set(np.flatnonzero(det.is_poison_)) == set(planted)


def test_hdbscan_agrees_with_sklearn(monkeypatch):
    rng = np.random.default_rng(4)
    x, y, planted = _classes(rng, n=1500, g=2, sub=(0, 60, 14.0))
    kw = {"n_components": 4, "method": "hdbscan", "min_cluster_size": 20, "min_samples": 5, "min_spread": 0}
    refs = [
        HDBSCAN(min_cluster_size=20, min_samples=5, allow_single_cluster=True, copy=True).fit_predict(
            _pca_by_class(x, y, c, 4)
        )
        for c in range(2)
    ]
    det = ActivationClustering(**kw).fit(x, y)  # the hdbscan package when installed
    for c in range(2):
        # the package and scikit-learn differ on the fringe rows they call noise
        assert adjusted_rand_score(det.clusters_[y == c], refs[c]) > 0.8
    assert set(np.flatnonzero(det.is_poison_)) == set(planted)
    monkeypatch.setitem(sys.modules, "hdbscan", None)  # scikit-learn's HDBSCAN
    det = ActivationClustering(**kw).fit(x, y)
    for c in range(2):
        assert adjusted_rand_score(det.clusters_[y == c], refs[c]) == pytest.approx(1.0)
    assert set(np.flatnonzero(det.is_poison_)) == set(planted)


def test_dbscan_agrees_with_sklearn():
    cluster = pytest.importorskip("poisonguard.cluster")
    if not hasattr(cluster, "DensityClustering"):
        pytest.skip("poisonguard.cluster has no DensityClustering")
    from sklearn.cluster import DBSCAN

    rng = np.random.default_rng(5)
    x, y, planted = _classes(rng, n=1500, g=2, sub=(0, 60, 14.0))
    det = ActivationClustering(n_components=3, method="dbscan", eps=2.5, min_samples=5, min_spread=0).fit(x, y)
    for c in range(2):
        ref = DBSCAN(eps=2.5, min_samples=5).fit_predict(_pca_by_class(x, y, c, 3))
        assert adjusted_rand_score(det.clusters_[y == c], ref) > 0.95
    assert set(np.flatnonzero(det.is_poison_)) == set(planted)


# -- detection --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_planted_small_cluster_is_found(method):
    rng = np.random.default_rng(6)
    x, y, planted = _classes(rng, n=4000, g=4, sub=(2, 120, 12.0))
    det = ActivationClustering(method=method, min_spread=0).fit(x.astype(np.float32), y)
    assert det.is_poison_[planted].mean() >= 0.95
    clean = np.ones(len(x), dtype=bool)
    clean[planted] = False
    assert det.is_poison_[clean].mean() <= 0.005
    # the scores rank the planted rows first within their class
    in_c = np.flatnonzero(y == 2)
    top = in_c[np.argsort(-det.scores_[in_c], kind="stable")[: len(planted)]]
    assert np.isin(top, planted).mean() >= 0.95
    assert np.isfinite(det.threshold_[2]) and np.all(det.scores_[planted] >= det.threshold_[2])
    assert np.all(np.isinf(det.threshold_[[0, 1, 3]]))


@pytest.mark.parametrize("seed", range(3))
def test_clean_classes_flag_nothing_by_default(seed):
    rng = np.random.default_rng(10 + seed)
    x, y, _ = _classes(rng, n=3000, g=3)
    for kw in ({}, {"analysis": "smaller"}, {"analysis": "silhouette"}, {"method": "hdbscan"}):
        det = ActivationClustering(**kw).fit(x, y)
        assert det.is_poison_.sum() == 0, kw
    # ART's choices flag the smaller k-means half of every clean class
    art = ActivationClustering(preset="art").fit(x, y)
    assert 0.3 < art.is_poison_.mean() < 0.5


def test_half_poisoned_class_is_not_cut_in_the_wrong_half():
    rng = np.random.default_rng(7)
    x, y, _ = _classes(rng, n=3000, g=3)
    idx = np.flatnonzero(y == 0)
    half = idx[: len(idx) // 2]
    x[half] += 15.0 * np.eye(x.shape[1])[0]
    det = ActivationClustering().fit(x, y)
    assert det.is_poison_.sum() == 0  # neither half is small: nothing flagged ...
    assert det.report()["separated_unflagged_classes"] == [0]  # ... but the split is reported


def test_art_preset_is_sklearn_pca_and_kmeans_seed_for_seed():
    rng = np.random.default_rng(16)
    x, y, _ = _classes(rng, n=1500, d=16, g=3, sub=(1, 90, 6.0))
    for seed in (0, 1):
        det = ActivationClustering(preset="art", seed=seed).fit(x, y)
        for c in range(3):
            with threadpool_limits(1):
                ref = KMeans(2, random_state=seed).fit_predict(_pca_by_class(x, y, c, 10))
            assert adjusted_rand_score(det.clusters_[y == c], ref) == pytest.approx(1.0)


def test_art_preset_matches_art_defence_when_installed():
    pytest.importorskip("art")
    from art.defences.detector.poison import ActivationDefence

    rng = np.random.default_rng(8)
    x, y, _ = _classes(rng, n=1200, d=16, g=3, sub=(1, 100, 12.0))
    x = x.astype(np.float32)

    class Stub:
        layer_names = ["penultimate"]  # noqa: RUF012
        nb_classes = 3

        def get_activations(self, xx, layer, batch_size=128, framework=False):
            return x

    defence = ActivationDefence(Stub(), x, np.eye(3, dtype=np.float32)[y])
    _, is_clean = defence.detect_poison()  # ART: PCA 10, KMeans 2, "smaller"
    art_flags = np.asarray(is_clean) == 0
    det = ActivationClustering(preset="art").fit(x, y)
    # k-means on the clean classes splits one blob; its seeds differ, so only the separated class must match exactly
    np.testing.assert_array_equal(det.is_poison_[y == 1], art_flags[y == 1])
    assert abs(int(det.is_poison_.sum()) - int(art_flags.sum())) < 0.1 * len(x)


def test_ica_finds_a_separated_cluster():
    rng = np.random.default_rng(9)
    x, y, planted = _classes(rng, n=2000, g=2, sub=(1, 80, 20.0))
    det = ActivationClustering(reduce="ica", n_components=4, min_spread=0).fit(x, y)
    assert set(np.flatnonzero(det.is_poison_)) == set(planted)
    assert det.report()["params"]["ica_iterations_max"] >= 1


def test_distance_rule_finds_a_cluster_near_another_class():
    rng = np.random.default_rng(11)
    x, y, _ = _classes(rng, n=3000, g=3, spread=4.0)
    idx = np.flatnonzero(y == 0)[:100]
    donor = np.flatnonzero(y == 2)[:100]
    x[idx] = x[donor] + 0.1 * rng.standard_normal(x[donor].shape)  # class-2 look-alikes labelled 0
    det = ActivationClustering(analysis="distance", min_spread=0).fit(x, y)
    assert set(np.flatnonzero(det.is_poison_)) == set(idx)
    art = ActivationClustering(analysis="distance", preset="art").fit(x, y)
    assert art.is_poison_[idx].all()


# -- degenerate and bad inputs --------------------------------------------------------------------------------------


def test_degenerate_inputs():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((200, 8))
    y = np.repeat([0, 1], 100)
    y1 = y.copy()
    y1[0] = 2  # a class of one sample
    for kw in ({}, {"preset": "art"}, {"method": "hdbscan"}):
        det = ActivationClustering(**kw).fit(x, y1)
        assert det.skipped_classes_ == [2] and not det.is_poison_[0]
    same = np.ones((200, 8))
    for kw in ({}, {"preset": "art"}, {"method": "hdbscan"}, {"reduce": "ica"}, {"analysis": "silhouette"}):
        det = ActivationClustering(**kw).fit(same, y)
        assert det.is_poison_.sum() == 0
        assert np.all(det.scores_ == 0)
    for kw in ({}, {"preset": "art"}, {"reduce": "ica"}, {"n_components": 20}, {"preset": "art", "n_components": 20}):
        det = ActivationClustering(**kw).fit(x[:, :1] if "n_components" not in kw else x, y)
        assert det.scores_.shape == (200,) and np.all(np.isfinite(det.scores_))
    y3 = y.copy()
    y3[:2] = 5  # two samples, three clusters asked
    det = ActivationClustering(n_clusters=3, analysis="smaller").fit(x, y3)
    assert det.skipped_classes_ == [5]
    assert det.report()["skipped_classes"] == [5]
    empty = ActivationClustering().fit(np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert empty.scores_.shape == (0,)


def test_bad_inputs():
    x = np.random.default_rng(0).standard_normal((50, 4))
    y = np.zeros(50, dtype=np.int64)
    xn = x.copy()
    xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ActivationClustering().fit(xn, y)
    with pytest.raises(ValueError, match="labels"):
        ActivationClustering().fit(x, y[:10])
    with pytest.raises(TypeError, match="float"):
        ActivationClustering().fit(x.astype(np.int64), y)
    for kw, what in (
        ({"reduce": "tsne"}, "reduce"),
        ({"method": "gmm"}, "method"),
        ({"analysis": "biggest"}, "analysis"),
        ({"preset": "paper"}, "preset"),
        ({"preset": "art", "method": "hdbscan"}, "preset"),
        ({"analysis": "distance", "n_clusters": 3}, "n_clusters"),
        ({"size_threshold": 0.0}, "size_threshold"),
        ({"min_separation": -1.0}, "min_separation"),
        ({"eps": 0.0}, "eps"),
    ):
        with pytest.raises(ValueError, match=what):
            ActivationClustering(**kw)
    with pytest.raises(ValueError, match="n_clusters"):
        ActivationClustering(n_clusters=1)
    with pytest.raises(TypeError, match="n_components"):
        ActivationClustering(n_components=2.5)
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(ImportError, match="pip install umap-learn"):
            ActivationClustering(reduce="umap").fit(x, y)
    with pytest.raises(RuntimeError, match="fit"):
        ActivationClustering().report()


# -- determinism, report, sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"preset": "art"}, {"method": "hdbscan"}, {"analysis": "silhouette"}])
def test_deterministic_for_a_seed(kw):
    rng = np.random.default_rng(13)
    x, y, _ = _classes(rng, n=2000, sub=(0, 90, 10.0))
    a = ActivationClustering(**kw).fit(x, y)
    b = ActivationClustering(**kw).fit(x, y)
    np.testing.assert_array_equal(a.clusters_, b.clusters_)
    np.testing.assert_array_equal(a.scores_, b.scores_)
    np.testing.assert_array_equal(a.is_poison_, b.is_poison_)


def test_report_contents():
    rng = np.random.default_rng(14)
    x, y, planted = _classes(rng, n=2000, sub=(1, 90, 12.0))
    det = ActivationClustering(analysis="silhouette", min_spread=0).fit(x, y)
    rep = det.report()
    assert rep["method"] == "activation-clustering"
    assert rep["params"]["analysis"] == "silhouette" and rep["params"]["min_separation"] == 4.5
    assert rep["n_samples"] == 2000 and rep["n_flagged"] == len(planted)
    row = rep["classes"][1]
    assert row["samples"] == int((y == 1).sum()) and row["flagged"] == len(planted)
    assert row["clusters"] == 2 and row["poison_clusters"] == 1 and row["noise"] == 0
    assert row["threshold"] == pytest.approx(det.threshold_[1])
    details = rep["cluster_details"][1]
    assert sorted(details["sizes"]) == [len(planted), int((y == 1).sum()) - len(planted)]
    assert details["poison"].count(True) == 1 and details["silhouette"] > 0.1
    assert max(details["separation"]) > 4.5
    assert rep["separated_unflagged_classes"] == []
    import json

    json.dumps(rep)  # plain types only


def test_array_and_npy_memmap_give_the_same_result(tmp_path):
    rng = np.random.default_rng(15)
    x, y, _ = _classes(rng, n=1500, sub=(2, 70, 12.0))
    x = x.astype(np.float32)
    path = tmp_path / "acts.npy"
    np.save(path, x)
    a = ActivationClustering(chunk_rows=256).fit(x, y)
    b = ActivationClustering(chunk_rows=256).fit(np.load(path, mmap_mode="r"), y)
    c = ActivationClustering(chunk_rows=999).fit(str(path), y)
    for other in (b, c):
        np.testing.assert_array_equal(a.is_poison_, other.is_poison_)
        np.testing.assert_allclose(a.scores_, other.scores_, rtol=1e-5, atol=1e-6)


def test_spread_gate_spares_a_narrow_sub_style(rng):
    x, y, planted = _classes(rng, sub=(1, 300, 40.0), wide=2.5)
    det = ActivationClustering().fit(x, y)
    assert det.is_poison_[planted].mean() > 0.95 and det.spread_[1] >= 2.0
    x, y, planted = _classes(rng, sub=(1, 300, 40.0), wide=1.0)
    narrow = ActivationClustering().fit(x, y)
    assert not narrow.is_poison_.any() and narrow.spread_[1] < 2.0 and np.isinf(narrow.threshold_[1])
    loose = ActivationClustering(min_spread=0).fit(x, y)
    assert loose.is_poison_[planted].mean() > 0.95
    assert ActivationClustering(preset="art").min_spread == 0 and narrow.report()["params"]["min_spread"] == 2.0
    with pytest.raises(ValueError, match="min_spread"):
        ActivationClustering(min_spread=-1)
