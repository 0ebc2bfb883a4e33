"""Detectors: fit(source, labels) -> self; scores_ [N] (higher = more suspicious), is_poison_ [N], threshold_ [G],
report()."""

from .spectral import SpectralSignature

__all__ = ["SpectralSignature"]
