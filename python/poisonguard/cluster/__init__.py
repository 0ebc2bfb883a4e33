"""Density clustering of activations: DBSCAN in memory (an exact kd-tree in ``_core`` for d <= 32, FAISS neighbour
search above) and out of core (FAISS k-means cells).

FAISS is an optional dependency (``pip install faiss-cpu`` or ``pip install poisonguard[faiss]``); this package
imports without it, the kd-tree path runs without it, and :meth:`DensityClustering.fit` raises ImportError naming it
when a FAISS index, ``eps=None`` or the out-of-core mode needs it.
"""

from __future__ import annotations

from .density import DensityClustering

__all__ = ["DensityClustering"]
