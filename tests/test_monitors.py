"""LossHistory / GradNormHistory (recording, growth, robust z, flags, ABL early learners, .npz round trip) and the
LossOutliers / GradientOutliers detectors (robust z on hand data, MAD = 0 classes, NaN, per class, bad input)."""

from __future__ import annotations

import numpy as np
import poisonguard
import pytest
from poisonguard import GradientOutliers, LossOutliers
from poisonguard.detect.loss import MAD_TO_SD, MEAN_AD_TO_SD, reduce_epochs, robust_z

torch = pytest.importorskip("torch")
from poisonguard.torch import GradNormHistory, LossHistory  # noqa: E402


# -- robust z -----------------------------------------------------------------------------------------------------
def test_robust_z_hand_computed():
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, |v - 3| = 2 1 0 1 97 -> MAD 1
    z = robust_z(v)
    np.testing.assert_allclose(z, (v - 3.0) / MAD_TO_SD, rtol=1e-15)


def test_robust_z_per_class_and_nan():
    v = np.array([1.0, 2.0, 3.0, np.nan, 10.0, 20.0, 30.0, 1000.0])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    z, center, scale, counts = robust_z(v, y, return_stats=True)
    np.testing.assert_array_equal(counts, [3, 4])
    assert center[0] == 2.0 and scale[0] == pytest.approx(MAD_TO_SD)
    assert np.isnan(z[3])
    # class 1: median 25, |dev| = 15 5 5 975 -> MAD 10
    assert center[1] == 25.0 and scale[1] == pytest.approx(10 * MAD_TO_SD)
    np.testing.assert_allclose(z[4:], (v[4:] - 25.0) / (10 * MAD_TO_SD))


def test_robust_z_mad_zero_falls_back_then_zero():
    v = np.array([5.0, 5.0, 5.0, 5.0, 9.0])  # MAD 0, mean |dev| = 0.8
    z = robust_z(v)
    np.testing.assert_allclose(z, (v - 5.0) / (MEAN_AD_TO_SD * 0.8))
    flat = robust_z(np.full(4, 2.5))
    np.testing.assert_array_equal(flat, 0.0)
    inf = robust_z(np.array([1.0, 1.0, np.inf]))
    assert inf[2] == np.inf and inf[0] == 0.0


def test_robust_z_empty_and_class_without_values():
    assert robust_z(np.zeros(0)).shape == (0,)
    z, center, _, counts = robust_z(np.array([1.0, 2.0]), np.array([0, 2]), return_stats=True)
    assert np.isnan(center[1]) and counts[1] == 0 and np.isfinite(z).all()


def test_reduce_epochs():
    v = np.array([[1.0, 3.0, np.nan], [np.nan, np.nan, np.nan], [2.0, 4.0, 6.0]])
    np.testing.assert_array_equal(reduce_epochs(v, "mean"), [2.0, np.nan, 4.0])
    np.testing.assert_array_equal(reduce_epochs(v, "last"), [np.nan, np.nan, 6.0])
    np.testing.assert_array_equal(reduce_epochs(v, 0), [1.0, np.nan, 2.0])
    np.testing.assert_array_equal(reduce_epochs(v, slice(0, 2)), [2.0, np.nan, 3.0])
    np.testing.assert_array_equal(reduce_epochs(v, [1, 2]), [3.0, np.nan, 5.0])
    with pytest.raises(ValueError, match="out of range"):
        reduce_epochs(v, 3)
    with pytest.raises(ValueError, match="'mean'"):
        reduce_epochs(v, "median")
    with pytest.raises(ValueError, match="selects no epoch"):
        reduce_epochs(v, slice(5, 6))


# -- detectors ------------------------------------------------------------------------------------------------------
def _planted(rng, n=300, classes=3, k=6):
    y = rng.integers(0, classes, n)
    v = rng.normal(1.0, 0.1, n) + y  # each class its own level
    bad = rng.choice(n, k, replace=False)
    v[bad] = y[bad] + 1.0 - 1.0  # five scales below their class
    return v, y, np.sort(bad)


def test_loss_outliers_finds_low_values(rng):
    v, y, bad = _planted(rng)
    det = LossOutliers().fit(v, y)
    assert det.direction == "low"
    np.testing.assert_array_equal(np.flatnonzero(det.is_poison_), bad)
    assert det.scores_.shape == v.shape and det.threshold_.shape == (3,)
    assert np.all(det.scores_[bad] >= det.threshold_[y[bad]])
    # without labels the class levels hide the planted samples among the others
    assert not np.array_equal(np.flatnonzero(LossOutliers().fit(v).is_poison_), bad)
    # "high" looks the other way
    assert not LossOutliers("high").fit(v, y).is_poison_[bad].any()
    both = LossOutliers("both").fit(v, y)
    np.testing.assert_allclose(both.scores_, np.abs(det.scores_))
    rep = det.report()
    assert rep["method"] == "loss_outliers" and rep["n_flagged"] == len(bad)
    assert rep["classes"][0]["median"] == pytest.approx(det.center_[0])


def test_gradient_outliers_default_high(rng):
    v = rng.normal(1.0, 0.1, 200)
    v[[3, 77]] = 5.0
    det = GradientOutliers().fit(torch.from_numpy(v))
    assert det.direction == "high"
    np.testing.assert_array_equal(np.flatnonzero(det.is_poison_), [3, 77])
    assert det.report()["method"] == "gradient_outliers"


def test_detector_epochs_nan_and_small_classes():
    v = np.array([[1.0, 1.2], [1.1, np.nan], [np.nan, np.nan], [0.9, 1.0], [1.05, 0.95], [0.2, 0.1], [1.0, 1.0]])
    y = np.array([0, 0, 0, 0, 0, 0, 1])
    det = LossOutliers(z=3.0, min_class_size=3).fit(v, y)
    assert np.isnan(det.scores_[2]) and not det.is_poison_[2]
    assert det.is_poison_[5]
    assert det.skipped_classes_ == [1] and det.threshold_[1] == np.inf and not det.is_poison_[6]
    last = LossOutliers(epochs="last", min_class_size=1).fit(v)
    np.testing.assert_array_equal(last.values_, v[:, -1])


def test_detectors_accept_history_and_bad_input():
    h = LossHistory(4)
    h.record([0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0])
    det = LossOutliers(min_class_size=1).fit(h)
    assert det.values_.shape == (4,)
    with pytest.raises(ValueError, match="direction"):
        LossOutliers("sideways")
    with pytest.raises(ValueError, match="z must be > 0"):
        LossOutliers(z=0)
    with pytest.raises(TypeError, match="z must be a finite number"):
        LossOutliers(z="3")
    with pytest.raises(TypeError, match="min_class_size"):
        LossOutliers(min_class_size=2.5)
    with pytest.raises(ValueError, match=r"\[N\] or \[N, epochs\]"):
        LossOutliers().fit(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="real numbers"):
        LossOutliers().fit(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="history"):
        LossOutliers().fit({"a": 1})
    with pytest.raises(ValueError, match="labels must have shape"):
        LossOutliers().fit(np.zeros(3), np.zeros(2, dtype=np.int64))
    with pytest.raises(TypeError, match="integer class ids"):
        LossOutliers().fit(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        LossOutliers().fit(np.zeros(3), np.array([0, -1, 0]))
    with pytest.raises(RuntimeError, match="fit"):
        LossOutliers().report()


def test_detectors_exported():
    assert poisonguard.LossOutliers is LossOutliers and poisonguard.GradientOutliers is GradientOutliers


# -- histories ------------------------------------------------------------------------------------------------------
def test_history_record_grow_and_values():
    h = LossHistory(5, n_epochs=1)
    h.record(torch.tensor([0, 2]), torch.tensor([0.5, 1.5], requires_grad=True))
    h.next_epoch()
    h.record(np.array([1, 2]), np.array([2.0, 3.0]))
    h.record([4], [9.0], epoch=6)  # grows the storage
    assert h.n_epochs == 7 and h._data.shape[1] >= 7
    v = h.values
    assert v.shape == (5, 7) and v.dtype == np.float32
    assert v[0, 0] == 0.5 and v[2, 0] == 1.5 and v[1, 1] == 2.0 and v[2, 1] == 3.0 and v[4, 6] == 9.0
    assert np.isnan(v[3]).all() and np.isnan(v[0, 1])
    np.testing.assert_array_equal(h.per_sample("mean"), [0.5, 2.0, 2.25, np.nan, 9.0])
    np.testing.assert_array_equal(h.per_sample(), [np.nan, np.nan, np.nan, np.nan, 9.0])


def test_history_flags_and_robust_z(rng):
    n = 200
    y = rng.integers(0, 2, n)
    loss = rng.normal(2.0, 0.2, n) + 3 * y
    loss[[5, 50]] = y[[5, 50]] * 3 + 0.1
    h = LossHistory(n)
    for start in range(0, n, 32):  # batches as a loader yields them
        idx = np.arange(start, min(n, start + 32))
        h.record(torch.from_numpy(idx), torch.from_numpy(loss[idx]).float())
    np.testing.assert_allclose(h.robust_z(y), robust_z(loss.astype(np.float32).astype(np.float64), y))
    np.testing.assert_array_equal(np.flatnonzero(h.flags(y)), [5, 50])
    assert not h.flags(y, direction="high")[[5, 50]].any()
    g = GradNormHistory(n)
    g.record(np.arange(n), loss)
    assert not g.flags(y)[[5, 50]].any()  # gradient norms look for HIGH values by default
    with pytest.raises(ValueError, match="direction"):
        h.flags(direction="up")
    with pytest.raises(ValueError, match="z must be"):
        h.flags(z=-1)


def test_early_learners_abl_view():
    h = LossHistory(8)
    early = np.array([0.1, 2.0, 2.1, 0.05, 1.9, 2.2, 2.0, 1.8])
    for e in range(3):
        h.record(np.arange(8), early + 0.01 * e, epoch=e)
    h.record(np.arange(8), np.zeros(8), epoch=3)  # late epochs do not count with epochs=3
    np.testing.assert_array_equal(h.early_learners(0.25, epochs=3), [0, 3])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(h.early_learners(0.25, epochs=3, labels=labels), [3, 7])
    assert h.early_learners(0.1, epochs=3).size == 0  # floor(0.8) = 0
    with pytest.raises(ValueError, match="fraction"):
        h.early_learners(0.0)
    with pytest.raises(ValueError, match="epochs"):
        h.early_learners(0.1, epochs=0)


def test_history_save_load_roundtrip(tmp_path):
    h = GradNormHistory(3)
    h.record([0, 2], [1.0, 2.0])
    h.next_epoch()
    h.record([1], [3.0])
    path = tmp_path / "gn.npz"
    h.save(path)
    back = GradNormHistory.load(path)
    np.testing.assert_array_equal(back.values, h.values)
    assert back.epoch == 1 and back.n_epochs == 2
    with np.load(path, allow_pickle=False) as f:  # nothing in it needs pickle
        assert set(f.files) == {"values", "epoch", "kind"}
    with pytest.raises(ValueError, match="grad_norm history, not loss"):
        LossHistory.load(path)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a saved history"):
        LossHistory.load(tmp_path / "other.npz")


def test_history_bad_input():
    h = LossHistory(4)
    with pytest.raises(ValueError, match="nothing recorded"):
        h.per_sample()
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        h.record([4], [1.0])
    with pytest.raises(TypeError, match="integers"):
        h.record(np.array([0.5]), [1.0])
    with pytest.raises(TypeError, match="integers"):
        h.record(torch.tensor([True]), [1.0])
    with pytest.raises(ValueError, match="must match"):
        h.record([0, 1], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        h.record([0], [[1.0]])
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        h.record([0], [1.0], epoch=-1)
    with pytest.raises(TypeError, match="real"):
        h.record([0], torch.tensor([True]))
    with pytest.raises(TypeError, match="n_samples"):
        LossHistory(2.5)


def test_detectors_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, poisonguard\n"
        "d = poisonguard.LossOutliers(min_class_size=1).fit(np.r_[np.ones(10), 0.0])\n"
        "assert d.is_poison_[-1] and d.is_poison_.sum() == 1\n"
        "try:\n"
        "    import poisonguard.torch\n"
        "except ImportError as e:\n"
        "    assert 'needs PyTorch' in str(e)\n"
        "else:\n"
        "    raise SystemExit('poisonguard.torch imported without torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_training_monitors_example_tiny():
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "training_monitors.py"
    spec = importlib.util.spec_from_file_location("training_monitors_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(epochs=2, n_samples=240, batch_size=32, verbose=False)
    losses, norms = out["histories"]
    assert losses.values.shape == (240, 2) and norms.values.shape == (240, 2)
    assert np.isfinite(losses.values).all() and (norms.values > 0).all()  # every sample seen once per epoch
    assert out["poisoned"].sum() == 12
    for precision, recall, n_flagged in out["views"].values():
        assert 0.0 <= precision <= 1.0 and 0.0 <= recall <= 1.0 and n_flagged >= 0
