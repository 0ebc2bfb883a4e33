"""Per-sample gradient-norm outliers: :class:`GradientOutliers` (robust per-class z-scores of the norms recorded by
:class:`poisonguard.torch.GradNormTracker` / :class:`poisonguard.torch.GradNormHistory`; see
:mod:`poisonguard.detect.loss` for the statistics)."""

from __future__ import annotations

from .loss import _OutlierDetector


class GradientOutliers(_OutlierDetector):
    """Flags samples whose per-sample gradient norm is a robust per-class outlier.

    Parameters
    ----------
    direction : ``"high"`` (default: poisoned and mislabelled samples pull harder than their class while they are
        being learned; gradient clipping defences rest on the same observation), ``"low"`` or ``"both"``.
    z : the cut on the robust z-score (default 3.5).
    epochs : how [N, epochs] values are reduced to one per sample: ``"mean"`` (default), ``"last"``, an epoch index,
        a slice or a sequence of epochs.
    min_class_size : classes with fewer values are not scored (threshold +inf, listed in ``skipped_classes_``).

    ``fit(values, labels)`` → self with ``scores_`` [N] (higher = more suspicious), ``is_poison_`` [N],
    ``threshold_`` [G]; ``report()`` → dict.
    """

    METHOD = "gradient_outliers"
    DEFAULT_DIRECTION = "high"


__all__ = ["GradientOutliers"]
