"""``scan``: the defence-in-depth pass over a training set's activations — every requested detector from one shared
pair of passes over the data, their flags cross-referenced, a result that saves and loads without pickle."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .detect import ActivationClustering, SpectralSignature, Spectre
from .detect._twopass import project_by_class

# Methods that read the activations (they share the passes over the source).
METHODS = ("spectral", "spectre", "clustering")
# Evidence from training signals, added when given: per-sample losses and gradient norms.
EVIDENCE = ("loss", "gradient")


@dataclass
class ScanResult:
    """What a scan found.

    ``is_poison [N]`` is the consensus flag; ``flags`` and ``scores`` hold each method's ``[N]`` arrays; ``labels
    [N]`` the classes scanned; ``per_class`` a list of rows (class, samples, flagged per method, consensus);
    ``agreement`` the pairwise overlap of the methods' flags; ``reports`` each detector's ``report()``;
    ``votes`` ``[N]`` how many methods flag each sample; :meth:`overlap_table` the cross-reference as text.
    """

    is_poison: np.ndarray
    flags: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    labels: np.ndarray
    per_class: list[dict]
    agreement: list[dict]
    reports: dict[str, dict]
    consensus: str
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def votes(self) -> np.ndarray:
        """``[N]`` int: how many methods flag each sample."""
        if not self.flags:
            return np.zeros(len(self.is_poison), dtype=np.int64)
        return np.sum([f.astype(np.int64) for f in self.flags.values()], axis=0)

    def overlap_table(self) -> str:
        """The cross-reference of the methods as text: for each pair, the samples both flag (the diagonal: each
        method's own count), then how many samples have each number of votes."""
        methods = list(self.flags)
        width = max([9, *(len(m) for m in methods)])
        lines = [" " * width + " " + " ".join(f"{m:>{width}}" for m in methods)]
        for a in methods:
            cells = " ".join(f"{int((self.flags[a] & self.flags[b]).sum()):>{width}}" for b in methods)
            lines.append(f"{a:>{width}} {cells}")
        counts = np.bincount(self.votes, minlength=len(methods) + 1)
        lines.append("votes: " + ", ".join(f"{v}: {int(counts[v])}" for v in range(1, len(methods) + 1)))
        lines.append(f"consensus ({self.consensus}): {int(self.is_poison.sum())}")
        return "\n".join(lines)

    def clean_indices(self) -> np.ndarray:
        """Indices of the samples not flagged by the consensus (what to keep when sanitising)."""
        return np.flatnonzero(~self.is_poison)

    def summary(self) -> dict:
        return {
            "format": "poisonguard-scan",
            "version": 1,
            "n_samples": len(self.is_poison),
            "n_flagged": int(self.is_poison.sum()),
            "methods": list(self.flags),
            "consensus": self.consensus,
            "per_class": self.per_class,
            "agreement": self.agreement,
            "reports": self.reports,
            "seconds": self.seconds,
            "meta": self.meta,
        }

    def save(self, folder: str | Path) -> Path:
        """Writes ``is_poison.npy``, ``labels.npy``, ``flags_<method>.npy``, ``scores_<method>.npy`` and
        ``summary.json`` into ``folder`` (created if needed)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "is_poison.npy", self.is_poison)
        np.save(out / "labels.npy", self.labels)
        for m in self.flags:
            np.save(out / f"flags_{m}.npy", self.flags[m])
            np.save(out / f"scores_{m}.npy", self.scores[m])
        (out / "summary.json").write_text(json.dumps(self.summary(), indent=2))
        return out

    @classmethod
    def load(cls, folder: str | Path) -> ScanResult:
        """Reads what :meth:`save` wrote (no pickle)."""
        out = Path(folder)
        try:
            summary = json.loads((out / "summary.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"{out} holds no summary.json: not a saved scan") from None
        if summary.get("format") != "poisonguard-scan":
            raise ValueError(f"{out / 'summary.json'} is not a poisonguard scan summary")

        def load(name: str) -> np.ndarray:
            return np.load(out / name, allow_pickle=False)

        methods = summary["methods"]
        return cls(
            is_poison=load("is_poison.npy"),
            flags={m: load(f"flags_{m}.npy") for m in methods},
            scores={m: load(f"scores_{m}.npy") for m in methods},
            labels=load("labels.npy"),
            per_class=summary["per_class"],
            agreement=summary["agreement"],
            reports=summary["reports"],
            consensus=summary["consensus"],
            seconds=summary["seconds"],
            meta=summary.get("meta", {}),
        )

    def table(self) -> str:
        """The per-class table as text."""
        methods = list(self.flags)
        head = f"{'class':>5} {'samples':>8} " + " ".join(f"{m:>9}" for m in methods) + f" {'consensus':>9}"
        rows = [head]
        for r in self.per_class:
            cells = " ".join(f"{r['flagged'][m]:>9}" for m in methods)
            rows.append(f"{r['class']:>5} {r['samples']:>8} {cells} {r['consensus']:>9}")
        return "\n".join(rows)


def _consensus(flags: dict[str, np.ndarray], rule: str | int) -> np.ndarray:
    stack = np.stack(list(flags.values()))
    votes = stack.sum(axis=0)
    if rule == "any":
        return votes >= 1
    if rule == "all":
        return votes == len(flags)
    if isinstance(rule, int) and not isinstance(rule, bool) and 1 <= rule <= len(flags):
        return votes >= rule
    raise ValueError(f"consensus must be 'any', 'all' or a vote count in [1, {len(flags)}], got {rule!r}")


def scan(
    source: Any,
    labels: Any,
    methods: tuple[str, ...] | list[str] = METHODS,
    *,
    expected_poison_fraction: float | str = "auto",
    n_classes: int | None = None,
    consensus: str | int | None = None,
    chunk_rows: int = 16384,
    spectral: dict | None = None,
    spectre: dict | None = None,
    clustering: dict | None = None,
    losses: Any = None,
    grad_norms: Any = None,
    loss: dict | None = None,
    gradient: dict | None = None,
    progress: bool = False,
    solver: str = "auto",
    memory_budget: int | None = None,
) -> ScanResult:
    """Scans activations ``[N, d]`` (array, tensor, ``.npy`` path or shard folder) with integer ``labels`` ``[N]``.

    All activation methods (``"spectral"``, ``"spectre"``, ``"clustering"``) share the passes over the source:
    per-class statistics, then the projections on each class's top directions (as many as the most demanding method
    needs). ``spectral`` / ``spectre`` / ``clustering`` take extra keyword arguments for :class:`SpectralSignature`
    / :class:`Spectre` / :class:`ActivationClustering`. Training signals are more evidence: ``losses`` and
    ``grad_norms`` (``[N]`` or ``[N, epochs]`` arrays, or a ``poisonguard.torch`` history) add the methods
    ``"loss"`` (:class:`LossOutliers`, keyword arguments in ``loss``) and ``"gradient"``
    (:class:`GradientOutliers`, in ``gradient``).

    ``consensus``: ``"any"``, ``"all"`` or a number of votes; the default (None) is the seed's cross-reference,
    flagged by at least 2 methods (``"any"`` when only one method runs).

    ``solver`` / ``memory_budget``: how the per-class directions are found (see
    :func:`poisonguard.detect._twopass.project_by_class`: the exact covariance route when its ``20·G·d²`` bytes fit
    the budget, default 2 GiB, else streamed subspace iteration); ``meta["solver"]`` says which ran and how many
    passes it took.
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    t0 = time.perf_counter()
    detectors: dict[str, Any] = {}
    if "spectral" in methods:
        detectors["spectral"] = SpectralSignature(expected_poison_fraction, chunk_rows=chunk_rows, **(spectral or {}))
    if "spectre" in methods:
        detectors["spectre"] = Spectre(expected_poison_fraction, chunk_rows=chunk_rows, **(spectre or {}))
    if "clustering" in methods:
        detectors["clustering"] = ActivationClustering(chunk_rows=chunk_rows, **(clustering or {}))
    evidence: dict[str, tuple[Any, Any]] = {}
    if losses is not None:
        from .detect import LossOutliers

        evidence["loss"] = (LossOutliers(**(loss or {})), losses)
    if grad_norms is not None:
        from .detect import GradientOutliers

        evidence["gradient"] = (GradientOutliers(**(gradient or {})), grad_norms)
    all_methods = [*detectors, *evidence]
    if consensus is None:
        consensus = 2 if len(all_methods) >= 2 else "any"
    _consensus({m: np.zeros(1, dtype=bool) for m in all_methods}, consensus)  # validate before reading anything
    k = max(getattr(det, "_k_needed", det.n_components) for det in detectors.values())
    projected = project_by_class(
        source,
        labels,
        n_classes,
        k,
        chunk_rows,
        progress=progress,
        clamp=True,
        solver=solver,
        memory_budget=memory_budget,
    )
    n_features, k = projected.directions.shape[1:]
    for det in detectors.values():
        det._fit_projected(projected)
    for name, (det, values) in evidence.items():
        det.fit(values, projected.labels)
        detectors[name] = det

    flags = {m: det.is_poison_ for m, det in detectors.items()}
    scores = {m: det.scores_ for m, det in detectors.items()}
    is_poison = _consensus(flags, consensus)
    y = projected.labels
    g = projected.n_classes
    per_class = []
    counts = np.bincount(y, minlength=g)
    by_method = {m: np.bincount(y[f], minlength=g) for m, f in flags.items()}
    cons = np.bincount(y[is_poison], minlength=g)
    for c in range(g):
        per_class.append(
            {
                "class": c,
                "samples": int(counts[c]),
                "flagged": {m: int(by_method[m][c]) for m in flags},
                "consensus": int(cons[c]),
            }
        )
    agreement = []
    names = list(flags)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = int((flags[a] & flags[b]).sum())
            either = int((flags[a] | flags[b]).sum())
            agreement.append(
                {"a": a, "b": b, "both": both, "only_a": int(flags[a].sum()) - both,
                 "only_b": int(flags[b].sum()) - both, "jaccard": both / either if either else 1.0}
            )  # fmt: skip
    return ScanResult(
        is_poison=is_poison,
        flags=flags,
        scores=scores,
        labels=y,
        per_class=per_class,
        agreement=agreement,
        reports={m: det.report() for m, det in detectors.items()},
        consensus=str(consensus),
        seconds=time.perf_counter() - t0,
        meta={
            "n_features": int(n_features),
            "n_classes": int(g),
            "n_components": int(k),
            "solver": projected.solver_info(),
        },
    )


__all__ = ["METHODS", "ScanResult", "scan"]
