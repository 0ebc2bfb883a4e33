"""Per-sample training-signal outliers: :class:`LossOutliers` (and the robust z-scores shared with
:class:`~poisonguard.detect.gradients.GradientOutliers` and the training-loop histories of :mod:`poisonguard.torch`).

A sample whose loss (or gradient norm) sits far from its class's typical value is suspicious. "Far" is measured
with a robust z-score, ``z = (v − median_c) / (1.4826 · MAD_c)`` per class ``c`` (the median absolute deviation
scaled to match the standard deviation of a normal distribution), so that the poisoned samples themselves do not
widen the yardstick. When a class's MAD is 0 (more than half of its values equal), the mean absolute deviation
around the median scaled by √(π/2) ≈ 1.2533 is used instead; when that is 0 too (all values equal), every z of the
class is 0. Missing values (NaN: a sample not seen in an epoch) are left out of the statistics and keep a NaN z.

Why the direction matters: under a patch backdoor (BadNets) the poisoned samples share one easy shortcut, so the
network learns them unusually fast and their loss is unusually LOW in the early epochs (the observation behind
anti-backdoor learning, Li et al., NeurIPS 2021) — hence ``direction="low"`` by default for losses. Their gradient
norms, by contrast, stand out as unusually HIGH while they are being learned (mislabelled or conflicting samples pull
hard), hence ``direction="high"`` for :class:`GradientOutliers`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ._base import detector_report

DIRECTIONS = ("low", "high", "both")
# Consistency constants of the robust scale estimates for normally distributed data.
MAD_TO_SD = 1.482602218505602
MEAN_AD_TO_SD = 1.2533141373155001


def as_values(values: Any, name: str = "values") -> np.ndarray:
    """``values`` ([N] or [N, epochs]; a numpy array, a torch tensor or anything with a ``values`` array such as a
    :class:`poisonguard.torch.LossHistory`) as float64 numpy (a copy when the input is not float64 already)."""
    if hasattr(values, "values") and not isinstance(values, np.ndarray) and not callable(values.values):
        values = values.values  # a history object
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    if isinstance(values, (list, tuple)):
        values = np.asarray(values)
    if not isinstance(values, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, a torch tensor or a history, got {type(values).__name__}")
    if values.dtype.kind not in "fiu" or values.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}")
    if values.ndim not in (1, 2):
        raise ValueError(f"{name} must be [N] or [N, epochs], got shape {values.shape}")
    return values.astype(np.float64, copy=False)


def reduce_epochs(values: np.ndarray, epochs: Any) -> np.ndarray:
    """One value per sample from ``values`` [N] or [N, E]: ``"mean"`` (the mean over the epochs in which the sample
    was seen; NaN when never), ``"last"`` (the last column), an int (that epoch, negative from the end), a slice or
    a sequence of epochs (mean over those)."""
    if values.ndim == 1:
        return values
    n_epochs = values.shape[1]
    if isinstance(epochs, str):
        if epochs == "last":
            epochs = -1
        elif epochs != "mean":
            raise ValueError(f"epochs must be 'mean', 'last', an int, a slice or a sequence of ints, got {epochs!r}")
        else:
            epochs = slice(None)
    if isinstance(epochs, (bool, np.bool_)):
        raise TypeError("epochs must not be a bool")
    if isinstance(epochs, (int, np.integer)):
        e = int(epochs)
        if not -n_epochs <= e < n_epochs:
            raise ValueError(f"epoch {e} is out of range for {n_epochs} recorded epoch(s)")
        return values[:, e]
    if isinstance(epochs, slice):
        block = values[:, epochs]
    else:
        idx = np.asarray(epochs)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise TypeError(f"epochs must be 'mean', 'last', an int, a slice or a sequence of ints, got {epochs!r}")
        if len(idx) and (idx.min() < -n_epochs or idx.max() >= n_epochs):
            raise ValueError(f"epochs {idx.tolist()} out of range for {n_epochs} recorded epoch(s)")
        block = values[:, idx]
    if block.shape[1] == 0:
        raise ValueError(f"epochs {epochs!r} selects no epoch of the {n_epochs} recorded")
    seen = ~np.isnan(block)
    count = seen.sum(axis=1)
    total = np.where(seen, block, 0.0).sum(axis=1)
    out = np.full(len(block), np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def class_labels(labels: Any, n: int) -> tuple[np.ndarray, int]:
    """Class ids ``[n]`` int64 (all zeros when ``labels`` is None) and the number of classes."""
    if labels is None:
        return np.zeros(n, dtype=np.int64), 1
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must hold integer class ids, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}], got {arr.shape}")
    if n and arr.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    arr = arr.astype(np.int64, copy=False)
    return arr, int(arr.max()) + 1 if n else 0


def robust_z(values: Any, labels: Any = None, *, return_stats: bool = False) -> Any:
    """Robust z-scores ``(v − median_c) / scale_c`` per class (see the module docstring for the scale and the MAD = 0
    fallback). ``values`` [N] (NaN = missing, kept as NaN); ``labels`` [N] int class ids or None (one class).

    Returns ``z`` [N] float64, or ``(z, center [G], scale [G], counts [G])`` with ``return_stats`` (``scale`` 0 for
    a class whose values are all equal; NaN centre and scale for a class with no value)."""
    v = as_values(values)
    if v.ndim != 1:
        raise ValueError(f"values must be [N] here, got shape {v.shape}; reduce the epochs first")
    y, g = class_labels(labels, len(v))
    z = np.full(len(v), np.nan)
    center = np.full(g, np.nan)
    scale = np.full(g, np.nan)
    ok = ~np.isnan(v)
    counts = np.bincount(y[ok], minlength=g)
    order = np.argsort(y, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(y, minlength=g))])
    for c in range(g):
        idx = order[bounds[c] : bounds[c + 1]]
        idx = idx[ok[idx]]
        if len(idx) == 0:
            continue
        vc = v[idx]
        finite = vc[np.isfinite(vc)]
        med = float(np.median(finite)) if len(finite) else 0.0
        dev = np.abs(finite - med)
        s = MAD_TO_SD * float(np.median(dev)) if len(finite) else 0.0
        if s == 0.0 and len(finite):
            s = MEAN_AD_TO_SD * float(dev.mean())
        center[c], scale[c] = med, s
        if s > 0:
            z[idx] = (vc - med) / s
        else:  # all finite values equal: they are not outliers; ±inf still are
            z[idx] = np.where(np.isfinite(vc), 0.0, np.copysign(np.inf, vc - med))
    if return_stats:
        return z, center, scale, counts
    return z


def oriented(z: np.ndarray, direction: str) -> np.ndarray:
    """Scores with higher = more suspicious: ``-z`` (low), ``z`` (high) or ``|z|`` (both)."""
    if direction == "low":
        return -z
    if direction == "high":
        return z.copy()
    return np.abs(z)


def _check_direction(direction: Any) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


class _OutlierDetector:
    """Robust per-class z-score outliers of one per-sample training signal."""

    METHOD = "outliers"
    DEFAULT_DIRECTION = "both"

    def __init__(
        self, direction: str | None = None, *, z: float = 3.5, epochs: Any = "mean", min_class_size: int = 5
    ) -> None:
        self.direction = _check_direction(self.DEFAULT_DIRECTION if direction is None else direction)
        if isinstance(z, bool) or not isinstance(z, (int, float, np.floating, np.integer)) or not np.isfinite(z):
            raise TypeError(f"z must be a finite number, got {z!r}")
        if z <= 0:
            raise ValueError(f"z must be > 0, got {z}")
        if isinstance(min_class_size, bool) or not isinstance(min_class_size, (int, np.integer)):
            raise TypeError(f"min_class_size must be an integer, got {type(min_class_size).__name__}")
        if min_class_size < 1:
            raise ValueError(f"min_class_size must be >= 1, got {min_class_size}")
        self.z = float(z)
        self.epochs = epochs
        self.min_class_size = int(min_class_size)

    def fit(self, values: Any, labels: Any = None) -> _OutlierDetector:
        """``values``: [N], [N, epochs] (NaN = not seen) or a history (``LossHistory`` / ``GradNormHistory``);
        ``labels``: [N] int class ids or None (one class). Sets ``scores_`` [N] (oriented robust z; NaN for samples
        without a value), ``is_poison_`` [N], ``threshold_`` [G] (the z cut on ``scores_``; +inf for a class with
        fewer than ``min_class_size`` values, which is skipped), ``center_`` / ``scale_`` [G] (per-class median and
        robust scale), ``counts_`` [G], ``labels_`` [N], ``skipped_classes_``, ``values_`` [N] (the reduced values)."""
        t0 = time.perf_counter()
        v = reduce_epochs(as_values(values), self.epochs)
        z, center, scale, counts = robust_z(v, labels, return_stats=True)
        y, g = class_labels(labels, len(v))
        scores = oriented(z, self.direction)
        threshold = np.full(g, self.z)
        small = counts < self.min_class_size
        threshold[small] = np.inf
        with np.errstate(invalid="ignore"):
            is_poison = np.nan_to_num(scores, nan=-np.inf) >= threshold[y] if len(v) else np.zeros(0, dtype=bool)
        self.values_ = v
        self.scores_ = scores
        self.is_poison_ = is_poison
        self.threshold_ = threshold
        self.center_ = center
        self.scale_ = scale
        self.counts_ = np.bincount(y, minlength=g).astype(np.int64)
        self.labels_ = y
        self.skipped_classes_ = [int(c) for c in np.flatnonzero(small & (self.counts_ > 0))]
        self.seconds_ = time.perf_counter() - t0
        return self

    def fit_predict(self, values: Any, labels: Any = None) -> np.ndarray:
        return self.fit(values, labels).is_poison_

    def report(self) -> dict:
        params = {
            "direction": self.direction,
            "z": self.z,
            "epochs": self.epochs if isinstance(self.epochs, (str, int)) else repr(self.epochs),
            "min_class_size": self.min_class_size,
        }
        rep = detector_report(self, self.METHOD, params)
        for row in rep["classes"]:
            c = row["class"]
            row["median"] = None if np.isnan(self.center_[c]) else float(self.center_[c])
            row["robust_scale"] = None if np.isnan(self.scale_[c]) else float(self.scale_[c])
        return rep


class LossOutliers(_OutlierDetector):
    """Flags samples whose per-sample training loss is a robust per-class outlier.

    Parameters
    ----------
    direction : ``"low"`` (default: samples learned unusually fast, as BadNets-style poison is), ``"high"``
        (unusually hard samples, e.g. flipped labels late in training) or ``"both"``.
    z : the cut on the robust z-score (default 3.5, Iglewicz & Hoaglin's rule for modified z-scores).
    epochs : how [N, epochs] values are reduced to one per sample: ``"mean"`` (default), ``"last"``, an epoch index,
        a slice or a sequence of epochs (e.g. ``slice(0, 5)`` for the early epochs where poison stands out most).
    min_class_size : classes with fewer values are not scored (threshold +inf, listed in ``skipped_classes_``).

    ``fit(values, labels)`` → self with ``scores_`` [N] (higher = more suspicious), ``is_poison_`` [N],
    ``threshold_`` [G]; ``report()`` → dict.
    """

    METHOD = "loss_outliers"
    DEFAULT_DIRECTION = "low"


__all__ = ["DIRECTIONS", "LossOutliers", "reduce_epochs", "robust_z"]
