"""Density clustering of activations: DBSCAN on FAISS neighbour search, in memory and out of core.

FAISS is an optional dependency (``pip install faiss-cpu`` or ``pip install poisonguard[faiss]``); this package
imports without it and :class:`DensityClustering` raises ImportError naming it when constructed.
"""

from __future__ import annotations

from .density import DensityClustering

__all__ = ["DensityClustering"]
