"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018) over streamed activations."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..ops.covariance import _as_int
from ._base import SPREAD_DIMS, detector_report, flag_top_fraction, mixture_flags, spread_gate
from ._twopass import Projected, check_solver, project_by_class

_PRESETS = ("paper", "art")


class SpectralSignature:
    """Per class: the top singular direction(s) of the centred activations; score = squared norm of the projection of
    the **centred** sample; flag the highest scores.

    Parameters
    ----------
    expected_poison_fraction : float in (0, 1] or ``"auto"``, default 0.05
        ε of the paper: the assumed poisoned share of a class. With a number, the top ``eps_multiplier · ε`` share of
        every class is flagged (the paper's rule). With ``"auto"``, the projections on each class's top direction
        are fitted with two Gaussians; when the modes are separated (Ashman's D ≥ ``auto_separation``) and the
        smaller mode is heterogeneous — its spread in the class's top-8 principal subspace (trace of its covariance)
        at least ``auto_spread`` times that of the larger mode — the samples of the smaller mode are flagged, else
        none, so a clean class loses almost nothing. The heterogeneity check is what tells a backdoor from a class's
        own sub-style: relabelled poison comes from other classes and keeps their variation, while a natural
        sub-style is no wider than the rest of its class (on Fashion-MNIST BadNets: 3.2-3.3 for the poison modes,
        0.8-1.7 for clean classes' second modes). It misses poison taken from one source class that is as narrow as
        the target class; ``auto_spread=0`` turns it off. ``scores_`` are the log-likelihood ratio of the smaller
        mode vs the larger (``threshold_`` 0, or +inf for a class with nothing flagged); ``separation_``,
        ``share_`` and ``spread_`` give D, the smaller mode's weight and the spread ratio per class.
    eps_multiplier : float, default 1.5
    n_components : int, default 1
        Directions per class (1 in the paper); the score sums the squared projections.
    preset : ``"paper"`` or ``"art"``
        ``"art"`` reproduces ART 1.20's ``SpectralSignatureDefense``: score ``|v·x|`` of the *uncentred* sample, and
        the class's samples at or above its ``1 − eps_multiplier · ε`` quantile flagged (ART's default
        ``expected_pp_poison=0.33`` flags about half of every class).
    chunk_rows : int, default 16384
        Rows per chunk of the two passes over the source.
    solver : ``"auto"``, ``"covariance"`` or ``"subspace"``
        How each class's top directions are found. ``"covariance"``: exact, from the streamed per-class covariance
        (about ``20·G·d²`` bytes). ``"subspace"``: streamed class-segmented subspace iteration, one more read of the
        source per iteration (usually 3-6), memory ``O(G·d·(k + 10))``. ``"auto"`` takes the covariance route when
        it fits ``memory_budget``. ``solver_`` says which ran, the passes and the final Ritz residual.
    memory_budget : int bytes, default None (2 GiB)
    auto_separation : float, default 2.5
        Ashman's D above which the ``"auto"`` rule calls two modes separated.
    auto_spread : float, default 2.0
        The ``"auto"`` rule's heterogeneity ratio (see above).

    Attributes after :meth:`fit`: ``scores_ [N]`` (higher = more suspicious), ``is_poison_ [N]`` bool,
    ``threshold_ [G]``, ``directions_ [G, d, k]``, ``means_ [G, d]``, ``counts_ [G]``, ``skipped_classes_``.
    Memory: ``O(chunk · d + G · d²)`` and two reads of the source, or ``O(chunk · d + G · d · k)`` and a few more
    reads on the subspace route.
    """

    def __init__(
        self,
        expected_poison_fraction: float | str = 0.05,
        *,
        eps_multiplier: float = 1.5,
        n_components: int = 1,
        preset: str = "paper",
        chunk_rows: int = 16384,
        solver: str = "auto",
        memory_budget: int | None = None,
        auto_separation: float = 2.5,
        auto_spread: float = 2.0,
    ) -> None:
        if preset not in _PRESETS:
            raise ValueError(f"preset must be one of {_PRESETS}, got {preset!r}")
        if expected_poison_fraction != "auto":
            if isinstance(expected_poison_fraction, str) or not 0 < float(expected_poison_fraction) <= 1:
                raise ValueError(
                    f"expected_poison_fraction must be in (0, 1] or 'auto', got {expected_poison_fraction!r}"
                )
        elif preset == "art":
            raise ValueError("preset='art' needs a numeric expected_poison_fraction (ART has no 'auto')")
        if not eps_multiplier > 0:
            raise ValueError(f"eps_multiplier must be > 0, got {eps_multiplier}")
        if not auto_separation > 0:
            raise ValueError(f"auto_separation must be > 0, got {auto_separation}")
        self.expected_poison_fraction = expected_poison_fraction
        self.eps_multiplier = float(eps_multiplier)
        self.n_components = _as_int(n_components, "n_components", 1)
        self.preset = preset
        self.chunk_rows = _as_int(chunk_rows, "chunk_rows", 1)
        self.solver, self.memory_budget = check_solver(solver, memory_budget)
        self.auto_separation = float(auto_separation)
        if not auto_spread >= 0:
            raise ValueError(f"auto_spread must be >= 0, got {auto_spread}")
        self.auto_spread = float(auto_spread)

    @property
    def _k_needed(self) -> int:
        """Directions the shared passes must provide: the "auto" rule measures spreads on the top 8."""
        return max(self.n_components, SPREAD_DIMS) if self.expected_poison_fraction == "auto" else self.n_components

    def fit(self, source: Any, labels: Any, *, n_classes: int | None = None) -> SpectralSignature:
        """Two passes over ``source`` (activations ``[N, d]``: array, tensor, ``.npy`` path or shard folder):
        per-class statistics, then scores. ``labels`` ``[N]`` integer classes. Returns ``self``."""
        t0 = time.perf_counter()
        projected = project_by_class(
            source,
            labels,
            n_classes,
            self._k_needed,
            self.chunk_rows,
            clamp=self._k_needed > self.n_components,
            solver=self.solver,
            memory_budget=self.memory_budget,
        )
        self._fit_projected(projected)
        self.seconds_ = time.perf_counter() - t0
        return self

    def _fit_projected(self, pr: Projected) -> None:
        """Scores and flags from the shared two-pass result (its first ``n_components`` directions)."""
        k, y = self.n_components, pr.labels
        p = pr.columns(k)
        if self.preset == "art":
            # ART projects the uncentred sample: v·x = v·(x − μ) + v·μ.
            offset = np.einsum("gd,gdk->gk", np.nan_to_num(pr.means), pr.directions[:, :, :k])
            scores = np.sqrt(((p + offset[y]) ** 2).sum(axis=1))
        elif self.expected_poison_fraction == "auto":
            # The signed projection on the top direction: poison is a second mode on one side of the clean mass,
            # even when it is a third of the class (|p| would fold the two modes together).
            scores = p[:, 0]
        else:
            scores = (p**2).sum(axis=1)
        small = pr.counts < 2
        self._flag(scores, pr)
        self.is_poison_[small[y]] = False
        self.threshold_[small] = np.inf
        self.scores_ = scores
        self.labels_ = y
        self.counts_ = pr.counts
        self.means_ = pr.means
        self.directions_ = pr.directions[:, :, :k]
        self.skipped_classes_ = [int(c) for c in np.flatnonzero(small & (pr.counts > 0))]
        self.solver_ = pr.solver_info()
        self.seconds_ = 0.0

    def _flag(self, scores: np.ndarray, pr: Projected) -> None:
        y, g = pr.labels, pr.n_classes
        if self.expected_poison_fraction == "auto":
            flags, llr, self.separation_, self.share_ = mixture_flags(scores, y, g, self.auto_separation, "minor")
            scores[:] = llr  # log-likelihood ratio, suspicious mode vs the other (higher = more suspicious)
            self.spread_ = spread_gate(pr, flags, self.auto_spread)
            self.is_poison_ = flags
            self.threshold_ = np.where(np.bincount(y[flags], minlength=g) > 0, 0.0, np.inf)
        elif self.preset == "art":
            q = max(1.0 - self.eps_multiplier * float(self.expected_poison_fraction), 0.0)
            self.threshold_ = np.full(g, np.inf)
            for c in np.flatnonzero(pr.counts):
                self.threshold_[c] = np.quantile(scores[pr.order[pr.bounds[c] : pr.bounds[c + 1]]], q)
            self.is_poison_ = scores >= self.threshold_[y]
        else:
            frac = min(1.0, self.eps_multiplier * float(self.expected_poison_fraction))
            self.is_poison_, self.threshold_ = flag_top_fraction(scores, y, g, frac)

    def report(self) -> dict:
        """Per-class counts and the parameters, as plain JSON-able types."""
        return detector_report(
            self,
            "spectral",
            {
                "expected_poison_fraction": self.expected_poison_fraction,
                "eps_multiplier": self.eps_multiplier,
                "n_components": self.n_components,
                "preset": self.preset,
                "auto_separation": self.auto_separation,
                "auto_spread": self.auto_spread,
            },
        )
