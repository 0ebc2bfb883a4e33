"""SpectralSignature: the paper's rule, ART 1.20's preset and the "auto" rule, against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
from poisonguard import SpectralSignature


def _poisoned(rng, n=6000, d=24, g=4, n_poison=120, shift=3.0):
    y = rng.integers(0, g, n)
    x = rng.standard_normal((n, d)) + 4 * rng.standard_normal((g, d))[y]
    target = np.flatnonzero(y == 1)
    poison = np.sort(rng.choice(target, n_poison, replace=False))
    x[poison] += shift * rng.standard_normal(d)
    return x, y, poison


def _paper_scores(x, y, g, centred=True):
    scores = np.zeros(len(x))
    for c in range(g):
        idx = np.flatnonzero(y == c)
        xc = x[idx]
        m = xc - xc.mean(axis=0)
        v = np.linalg.svd(m, full_matrices=False)[2][0]
        scores[idx] = ((m if centred else xc) @ v) ** 2
    return scores


def test_paper_rule_matches_numpy(rng):
    x, y, _ = _poisoned(rng)
    det = SpectralSignature(0.05).fit(x, y)
    ref = _paper_scores(x, y, 4)
    np.testing.assert_allclose(det.scores_, ref, rtol=1e-8, atol=1e-8)
    for c in range(4):
        idx = np.flatnonzero(y == c)
        n_flag = int(np.floor(1.5 * 0.05 * len(idx) + 1e-9))
        assert det.is_poison_[idx].sum() == n_flag
        top = idx[np.argsort(-ref[idx], kind="stable")[:n_flag]]
        assert set(top) == set(np.flatnonzero(det.is_poison_ & (y == c)))


def test_art_preset_matches_art_rule(rng):
    x, y, _ = _poisoned(rng)
    det = SpectralSignature(0.33, preset="art").fit(x.astype(np.float32), y)
    x32 = x.astype(np.float32).astype(np.float64)
    for c in range(4):
        idx = np.flatnonzero(y == c)
        xc = x32[idx]
        v = np.linalg.svd(xc - xc.mean(axis=0), full_matrices=False)[2][:1]
        score = np.linalg.norm(v @ xc.T, axis=0)  # ART 1.20.1: uncentred projection
        cutoff = np.quantile(score, max(1 - 1.5 * 0.33, 0.0))
        np.testing.assert_allclose(det.scores_[idx], score, rtol=1e-5, atol=1e-4)  # float32 products
        expected = score >= cutoff
        # identical sets, ties at the cutoff aside
        disagree = expected != det.is_poison_[idx]
        assert np.all(np.isclose(score[disagree], cutoff, rtol=1e-4, atol=1e-4))


def test_art_preset_equals_art_code_when_installed(rng):
    art = pytest.importorskip("art.defences.detector.poison.spectral_signature_defense")
    x, y, _ = _poisoned(rng, n=2000)
    det = SpectralSignature(0.33, preset="art").fit(x, y)
    for c in range(4):
        idx = np.flatnonzero(y == c)
        score = art.SpectralSignatureDefense.spectral_signature_scores(x[idx])[:, 0]
        np.testing.assert_allclose(det.scores_[idx], score, rtol=1e-8)


def _relabelled(rng, n=6000, d=24, g=4, n_poison=300, trigger=6.0, natural_mode=False):
    """Classes with a few strong latent factors; the poison is taken from the other classes, given a common
    trigger offset and relabelled to class 1 (a BadNets-like all-to-one attack). With ``natural_mode``, class 2 also
    has a homogeneous second mode (a sub-style of the class: same spread, shifted)."""
    y = rng.integers(0, g, n)
    centres = 4 * rng.standard_normal((g, d))
    x = rng.standard_normal((n, d)) + centres[y]
    if natural_mode:
        sub = np.flatnonzero(y == 2)[: (y == 2).sum() // 4]
        x[sub] += 5.0 * rng.standard_normal(d) / np.sqrt(d) * 3
    src = np.flatnonzero(y != 1)
    poison = np.sort(rng.choice(src, n_poison, replace=False))
    x[poison] += trigger * rng.standard_normal(d) / np.sqrt(d) * 2
    y[poison] = 1
    return x, y, poison


def test_auto_finds_relabelled_poison_and_spares_clean_classes(rng):
    x, y, poison = _relabelled(rng, natural_mode=True)
    det = SpectralSignature("auto").fit(x.astype(np.float32), y)
    assert det.is_poison_[poison].mean() >= 0.95
    clean = np.ones(len(x), dtype=bool)
    clean[poison] = False
    assert det.is_poison_[clean].mean() <= 0.01
    assert det.spread_[1] >= 2.0  # the poison mode is wider: it keeps the variation of its source classes
    # class 2's sub-style is a separated second mode, but as narrow as the rest of its class: not flagged
    assert det.separation_[2] >= det.auto_separation and det.spread_[2] < 2.0
    assert not det.is_poison_[y == 2].any() and np.isinf(det.threshold_[2])
    assert det.report()["params"]["auto_spread"] == 2.0
    # without the heterogeneity check, the sub-style is flagged as well
    loose = SpectralSignature("auto", auto_spread=0).fit(x, y)
    assert loose.is_poison_[y == 2].sum() > 100
    x2, y2, _ = _relabelled(rng, n_poison=0)
    det2 = SpectralSignature("auto").fit(x2, y2)
    assert det2.is_poison_.mean() <= 0.01


def test_auto_spread_is_validated():
    with pytest.raises(ValueError, match="auto_spread"):
        SpectralSignature("auto", auto_spread=-1)


def test_sources_and_chunking_agree(rng, tmp_path):
    import torch

    x, y, _ = _poisoned(rng, n=3000)
    x = x.astype(np.float32)
    ref = SpectralSignature(0.05).fit(x, y)
    path = tmp_path / "acts.npy"
    np.save(path, x)
    np.save(tmp_path / "labels.npy", y)
    for src, lab, chunk in [(path, tmp_path / "labels.npy", 100), (torch.from_numpy(x), torch.from_numpy(y), 777)]:
        det = SpectralSignature(0.05, chunk_rows=chunk).fit(src, lab)
        np.testing.assert_allclose(det.scores_, ref.scores_, rtol=2e-5, atol=1e-4)
        assert (det.is_poison_ == ref.is_poison_).mean() > 0.999


def test_small_classes_are_reported_not_flagged(rng):
    x, y, _ = _poisoned(rng, n=600, g=3, n_poison=10)
    x = np.vstack([x, rng.standard_normal((1, x.shape[1]))])
    y = np.concatenate([y, [3]])  # class 3: one sample
    det = SpectralSignature("auto").fit(x, y, n_classes=5)  # class 4: never seen
    rep = det.report()
    assert rep["skipped_classes"] == [3]
    assert not det.is_poison_[-1]
    assert rep["classes"][4]["samples"] == 0 and rep["classes"][4]["flagged"] == 0
    assert rep["n_samples"] == len(x)


def test_bad_input(rng):
    x, y, _ = _poisoned(rng, n=400, n_poison=10)
    with pytest.raises(ValueError, match="preset"):
        SpectralSignature(preset="nope")
    with pytest.raises(ValueError, match="expected_poison_fraction"):
        SpectralSignature(1.5)
    with pytest.raises(ValueError, match="expected_poison_fraction"):
        SpectralSignature("sometimes")
    with pytest.raises(ValueError, match="'auto'"):
        SpectralSignature("auto", preset="art")
    with pytest.raises(ValueError, match="eps_multiplier"):
        SpectralSignature(eps_multiplier=0)
    with pytest.raises(ValueError, match="rows"):
        SpectralSignature().fit(x, y[:-1])
    with pytest.raises(ValueError, match="n_components"):
        SpectralSignature(n_components=100).fit(x, y)
    with pytest.raises(ValueError, match="n_classes"):
        SpectralSignature().fit(x, y, n_classes=2)
    with pytest.raises(RuntimeError, match="fit"):
        SpectralSignature().report()
    with pytest.raises(TypeError):
        SpectralSignature().fit(x.astype(np.int64), y)
    bad = x.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="first at row 5"):
        SpectralSignature().fit(bad, y)


def test_mixture_flags_separated_minor_mode_only(rng):
    from poisonguard.detect._base import mixture_flags

    one = rng.standard_normal(2000)
    two = np.concatenate([rng.standard_normal(900), rng.standard_normal(100) * 0.5 + 8])
    values = np.concatenate([one, two])
    labels = np.repeat([0, 1], [2000, 1000])
    flags, llr, sep, share = mixture_flags(values, labels, 3, 2.5, "minor")
    assert (llr[2900:] > 0).all()
    assert not flags[:2000].any() and sep[0] < 2.5
    assert flags[2000 + 900 :].all() and not flags[2000:2900].any()
    assert sep[1] > 5 and abs(share[1] - 0.1) < 0.02 and sep[2] == 0
    up, _, _, _ = mixture_flags(-values, labels, 3, 2.5, "upper")  # the small mode is now the lower one
    assert not up.any()


def test_batched_two_gaussian_fit_recovers_each_mixture(rng):
    from poisonguard.detect._base import _two_gaussians_batch

    samples = [
        np.concatenate([rng.normal(0, 1, 700), rng.normal(8, 0.5, 300)]),
        np.concatenate([rng.normal(-3, 2, 60), rng.normal(5, 1, 40)]),  # fewer points than the others: padded
        rng.normal(1, 1, 5000),  # one mode, thinned to 500 order statistics
    ]
    w, mu, sd = _two_gaussians_batch(samples)
    assert w.shape == mu.shape == sd.shape == (3, 2)
    np.testing.assert_allclose(np.sort(mu[0]), [0, 8], atol=0.2)
    np.testing.assert_allclose(w[0][np.argsort(mu[0])], [0.7, 0.3], atol=0.03)
    np.testing.assert_allclose(np.sort(mu[1]), [-3, 5], atol=0.8)
    for i, v in enumerate(samples):  # each row is the fit of that sample alone
        wi, mi, si = _two_gaussians_batch([v])
        np.testing.assert_allclose(mi[0], mu[i], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(wi[0], w[i], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(si[0], sd[i], rtol=1e-9, atol=1e-9)
