"""Per-sample training histories keyed by dataset index: :class:`LossHistory` and :class:`GradNormHistory`.

The training loop records, for every batch, the dataset indices of its samples (the loader yields them) and one value
per sample (the unreduced loss, or ``GradNormTracker.norms``)::

    history = LossHistory(len(dataset))
    for epoch in range(n_epochs):
        for idx, x, y in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            history.record(idx, losses, epoch=epoch)
            losses.mean().backward()
            ...
    suspicious = history.flags(labels=train_labels)          # robust z per class, direction "low" for losses
    isolated = history.early_learners(0.01, epochs=5)        # the ABL view: lowest loss in the first epochs

Storage is a float32 ``[n_samples, capacity]`` array preallocated and doubled along the epochs as needed (NaN =
not seen in that epoch); values are detached and copied to the CPU when recorded. ``save`` / ``load`` use ``.npz``
without pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..detect.loss import DIRECTIONS, oriented, reduce_epochs, robust_z
from ..ops.covariance import _as_int


class _SampleHistory:
    KIND = "values"
    DIRECTION = "both"

    def __init__(self, n_samples: int, n_epochs: int = 8) -> None:
        self.n_samples = _as_int(n_samples, "n_samples", 0)
        cap = _as_int(n_epochs, "n_epochs", 1)
        self._data = np.full((self.n_samples, cap), np.nan, dtype=np.float32)
        self.n_epochs = 0  # epochs with at least one record (the highest epoch recorded + 1)
        self.epoch = 0  # the epoch `record(..., epoch=None)` writes to

    # -- recording ----------------------------------------------------------------------------------------------------
    def record(self, indices: Any, values: Any, epoch: int | None = None) -> None:
        """Stores ``values`` [b] for the dataset ``indices`` [b] in ``epoch`` (default: ``self.epoch``, advanced by
        :meth:`next_epoch`). Tensors are detached and copied to the CPU; a value recorded twice for the same sample
        and epoch overwrites the earlier one."""
        idx = _as_indices(indices, self.n_samples)
        vals = _as_floats(values, "values")
        if vals.shape != idx.shape:
            raise ValueError(f"values has shape {vals.shape} but indices has shape {idx.shape}; they must match")
        e = self.epoch if epoch is None else _as_int(epoch, "epoch", 0)
        if e >= self._data.shape[1]:
            cap = self._data.shape[1]
            while cap <= e:
                cap *= 2
            grown = np.full((self.n_samples, cap), np.nan, dtype=np.float32)
            grown[:, : self._data.shape[1]] = self._data
            self._data = grown
        self._data[idx, e] = vals
        self.n_epochs = max(self.n_epochs, e + 1)

    def next_epoch(self) -> int:
        """Moves ``self.epoch`` on by one and returns it."""
        self.epoch += 1
        return self.epoch

    @property
    def values(self) -> np.ndarray:
        """``[n_samples, n_epochs]`` float32 view (NaN = not seen in that epoch)."""
        return self._data[:, : self.n_epochs]

    # -- analysis -----------------------------------------------------------------------------------------------------
    def per_sample(self, epoch: Any = -1) -> np.ndarray:
        """One float64 value per sample: ``epoch`` = an epoch index (default -1: the last recorded), ``"mean"`` (mean
        over the epochs the sample was seen in), ``"last"``, a slice or a sequence of epochs (mean over those)."""
        if self.n_epochs == 0:
            raise ValueError("nothing recorded yet")
        return reduce_epochs(self.values.astype(np.float64), epoch)

    def robust_z(self, labels: Any = None, epoch: Any = -1) -> np.ndarray:
        """Robust z-scores ``(v − median_c) / (1.4826·MAD_c)`` per class of :meth:`per_sample` (see
        :func:`poisonguard.detect.loss.robust_z`; NaN for samples without a value)."""
        return robust_z(self.per_sample(epoch), labels)

    def flags(self, labels: Any = None, z: float = 3.5, epoch: Any = -1, direction: str | None = None) -> np.ndarray:
        """``[n_samples]`` bool: robust per-class outliers beyond ``z`` on the ``direction`` side (default: ``"low"``
        for losses, ``"high"`` for gradient norms)."""
        direction = self.DIRECTION if direction is None else direction
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
            raise ValueError(f"z must be a positive number, got {z!r}")
        s = oriented(self.robust_z(labels, epoch), direction)
        return np.nan_to_num(s, nan=-np.inf) >= z

    def early_learners(self, fraction: float = 0.01, epochs: int = 5, labels: Any = None) -> np.ndarray:
        """The anti-backdoor-learning view (Li et al., 2021): dataset indices (ascending) of the ``fraction`` of
        samples with the LOWEST mean value over the first ``epochs`` recorded epochs — for losses, the samples learned
        unusually fast, which is how backdoor poison behaves. With ``labels``, the fraction is taken in every class.
        Samples not seen in those epochs are never selected; ties are broken by index."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        epochs = _as_int(epochs, "epochs", 1)
        if self.n_epochs == 0:
            raise ValueError("nothing recorded yet")
        v = reduce_epochs(self.values.astype(np.float64), slice(0, min(epochs, self.n_epochs)))
        if labels is None:
            groups = np.zeros(self.n_samples, dtype=np.int64)
        else:
            groups = _as_indices(labels, np.iinfo(np.int64).max, name="labels")
            if groups.shape != (self.n_samples,):
                raise ValueError(f"labels must have shape [{self.n_samples}], got {groups.shape}")
        seen = ~np.isnan(v)
        chosen = []
        for c in np.unique(groups[seen]):
            idx = np.flatnonzero(seen & (groups == c))
            k = int(np.floor(fraction * len(idx) + 1e-9))
            if k:
                order = np.lexsort((idx, v[idx]))
                chosen.append(idx[order[:k]])
        return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

    # -- persistence --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Writes ``values``, ``epoch`` and the history kind to an ``.npz`` file (no pickle)."""
        np.savez(path, values=self.values, epoch=np.int64(self.epoch), kind=np.array(self.KIND))

    @classmethod
    def load(cls, path: str | Path) -> _SampleHistory:
        """Reads a file written by :meth:`save` of the same kind of history."""
        with np.load(path, allow_pickle=False) as f:
            missing = {"values", "epoch", "kind"} - set(f.files)
            if missing:
                raise ValueError(f"{path} is not a saved history: missing {sorted(missing)}")
            kind = str(f["kind"])
            if kind != cls.KIND:
                raise ValueError(f"{path} holds a {kind} history, not {cls.KIND}")
            values = np.asarray(f["values"], dtype=np.float32)
            epoch = int(f["epoch"])
        if values.ndim != 2:
            raise ValueError(f"{path}: values must be 2-D [n_samples, n_epochs], got shape {values.shape}")
        h = cls(values.shape[0], max(values.shape[1], 1))
        h._data[:, : values.shape[1]] = values
        h.n_epochs = values.shape[1]
        h.epoch = epoch
        return h

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples={self.n_samples}, n_epochs={self.n_epochs}, epoch={self.epoch})"


class LossHistory(_SampleHistory):
    """Per-sample losses over epochs, keyed by dataset index (see the module docstring). ``flags`` looks for
    unusually LOW losses by default (poison learned fast)."""

    KIND = "loss"
    DIRECTION = "low"


class GradNormHistory(_SampleHistory):
    """Per-sample gradient norms over epochs (``GradNormTracker.norms``), keyed by dataset index. ``flags`` looks
    for unusually HIGH norms by default."""

    KIND = "grad_norm"
    DIRECTION = "high"


def _as_indices(indices: Any, n: int, name: str = "indices") -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {indices.dtype}")
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if len(arr) and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} must be in [0, {n}), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def _as_floats(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if not (values.dtype.is_floating_point or values.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real-valued tensor, got {values.dtype}")
        values = values.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per sample), got shape {arr.shape}")
    return arr.astype(np.float32)


__all__ = ["GradNormHistory", "LossHistory"]
