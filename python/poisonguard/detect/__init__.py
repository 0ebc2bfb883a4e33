"""Detectors: fit(source, labels) -> self; scores_ [N] (higher = more suspicious), is_poison_ [N], threshold_ [G],
report()."""

from .gradients import GradientOutliers
from .loss import LossOutliers
from .spectral import SpectralSignature
from .spectre import Spectre

__all__ = ["GradientOutliers", "LossOutliers", "SpectralSignature", "Spectre"]
