"""Detectors: fit(source, labels) -> self; scores_ [N] (higher = more suspicious), is_poison_ [N], threshold_ [G],
report()."""

from .clustering import ActivationClustering
from .gradients import GradientOutliers
from .loss import LossOutliers
from .spectral import SpectralSignature
from .spectre import Spectre

__all__ = ["ActivationClustering", "GradientOutliers", "LossOutliers", "SpectralSignature", "Spectre"]
