"""Streaming per-class mean and covariance (the statistics behind spectral signatures, SPECTRE and PCA)."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _core
from .._interop import as_index_array, describe, device_matrix, host_matrix, is_cuda_tensor, is_torch_tensor

_STATE_KEYS = ("count", "mean", "m2")
# Budget of each fp32 staging buffer (rows: G·R·d floats; scatter: G·d² floats) and the row-stage bounds.
_STAGING_BYTES = 96 * 2**20
_STAGE_MAX_ROWS = 16384
_STAGE_MIN_ROWS = 256


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


# Staging buffers of accumulators that are gone, kept for the next one of the same shape: a new accumulator then
# skips the first touch of ~100 MB of fresh pages (≈10% of a 200k x 512 pass here). One set per shape, the
# most recent shapes only.
_STAGING_POOL: dict[tuple[int, int, int], tuple] = {}
_STAGING_POOL_MAX = 2


def _take_staging(g: int, rows: int, d: int) -> tuple:
    staging = _STAGING_POOL.pop((g, rows, d), None)
    if staging is not None:
        for counter in (staging[1], staging[4], staging[5]):  # rows staged, Σ(x − s), rows in the scatter
            counter[...] = 0
        return staging
    return (
        np.zeros((g, rows, d), dtype=np.float32),
        np.zeros(g, dtype=np.int64),
        np.zeros((g, d, d), dtype=np.float32),
        np.zeros((g, d), dtype=np.float32),
        np.zeros((g, d), dtype=np.float64),
        np.zeros(g, dtype=np.int64),
    )


def _give_back_staging(staging: tuple) -> None:
    key = (staging[0].shape[0], staging[0].shape[1], staging[0].shape[2])
    _STAGING_POOL.pop(key, None)
    while len(_STAGING_POOL) >= _STAGING_POOL_MAX:  # keep the most recent shapes
        _STAGING_POOL.pop(next(iter(_STAGING_POOL)))
    _STAGING_POOL[key] = staging


def _symmetric(m2_upper: np.ndarray) -> np.ndarray:
    """Full symmetric [G, d, d] from the upper triangles the kernels maintain."""
    upper = np.triu(m2_upper)
    return upper + np.triu(m2_upper, 1).transpose(0, 2, 1)


class StreamingCovariance:
    """Per-group count, mean and covariance of rows streamed in chunks, in one pass.

    Each chunk is split by group; every group's rows are shifted by the group's running mean (or, for a group seen
    for the first time, by its mean in the chunk), multiplied in the input's compute type (float32 for float16,
    bfloat16 and float32 input; float64 for float64) with BLAS SYRK, and merged into float64 state with Chan's
    pairwise formula. The result equals a float64 two-pass computation over the concatenated data to about 1e-7
    relative error, also when the mean is large next to the spread.

    Parameters
    ----------
    n_features : int
        Row length ``d``.
    n_groups : int, default 1
        Number of groups (classes) ``G``; rows carry ids in ``[0, G)``.

    Notes
    -----
    Memory is ``O(G·d²)`` float64 for the state plus ``O(chunk·d)`` for a working copy of one chunk in the compute
    type. Host updates release the GIL and use all cores (see :func:`poisonguard.set_num_threads`). CUDA tensors
    are accumulated on their device; the state then lives there until it is read or merged.
    """

    def __init__(self, n_features: int, n_groups: int = 1) -> None:
        d = _as_int(n_features, "n_features", 0)
        g = _as_int(n_groups, "n_groups", 1)
        self._count = np.zeros(g, dtype=np.int64)
        self._mean = np.zeros((g, d), dtype=np.float64)
        self._m2 = np.zeros((g, d, d), dtype=np.float64)  # upper triangles are authoritative
        # fp32 staging between chunks and the float64 state (CovPending in csrc/covariance.h): per group, up to R
        # shifted rows waiting for one large SYRK, and the scatter of rows not merged yet. Sized from a memory budget;
        # off when it would not fit (then every chunk is multiplied and merged at once).
        self._pending: tuple | None = None
        rows = min(_STAGE_MAX_ROWS, _STAGING_BYTES // max(1, 4 * g * d))
        if d and rows >= _STAGE_MIN_ROWS and g * d * d * 4 <= _STAGING_BYTES:
            self._pending = _take_staging(g, rows, d)
            weakref.finalize(self, _give_back_staging, self._pending)
        self._device_state: tuple | None = None  # (count, mean, m2) torch tensors while the state is on a GPU

    # -- shape ---------------------------------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return self._mean.shape[1]

    @property
    def n_groups(self) -> int:
        return self._mean.shape[0]

    def __repr__(self) -> str:
        where = "cuda" if self._device_state is not None else "cpu"
        return (
            f"StreamingCovariance(n_features={self.n_features}, n_groups={self.n_groups}, "
            f"samples={int(self.count.sum())}, state_on={where})"
        )

    # -- accumulation --------------------------------------------------------------------------------------------
    def update(self, x: Any, groups: Any = None) -> StreamingCovariance:
        """Adds the rows of ``x`` ``[n, d]`` (float16/bfloat16/float32/float64; numpy or torch) to the statistics.

        ``groups`` ``[n]`` holds integer ids in ``[0, n_groups)``; ``None`` puts every row in group 0. ``x`` is
        read in place (any strides, no copy); non-int64 ``groups`` are converted (a copy of ``n`` integers).
        A chunk with NaN/Inf rows or bad ids raises ``ValueError`` and adds nothing. Returns ``self``.
        """
        if is_cuda_tensor(x):
            return self._update_cuda(x, groups)
        arr, bf16 = host_matrix(x, "x")
        n, d = arr.shape
        if d != self.n_features:
            raise ValueError(f"x has {d} features but this accumulator was built for n_features={self.n_features}")
        if groups is None:
            if self.n_groups != 1 and n:
                raise ValueError(f"groups is required when n_groups={self.n_groups} > 1")
            ids = None
        else:
            ids = as_index_array(groups, n, self.n_groups)
        if n == 0:
            return self
        self._to_host(flush=False)
        _core.covariance_update(arr, ids, self._count, self._mean, self._m2, bf16, self._pending)
        return self

    def _flush(self) -> None:
        """Merges the fp32-staged rows into the float64 state (every reader calls this first)."""
        if self._pending is not None and (self._pending[1].any() or self._pending[5].any()):
            _core.covariance_flush(self._count, self._mean, self._m2, self._pending)

    def _update_cuda(self, x: Any, groups: Any) -> StreamingCovariance:  # pragma: no cover - needs a GPU
        import torch

        if not _core.built_with_cuda():
            raise RuntimeError(
                "x is a CUDA tensor but poisonguard was built without CUDA; reinstall with POISONGUARD_CUDA=ON "
                "(nvcc on PATH) or pass x.cpu()"
            )
        dm = device_matrix(x, "x")
        if dm.cols != self.n_features:
            raise ValueError(
                f"x has {dm.cols} features but this accumulator was built for n_features={self.n_features}"
            )
        if groups is None:
            if self.n_groups != 1 and dm.rows:
                raise ValueError(f"groups is required when n_groups={self.n_groups} > 1")
            g = None
        else:
            if not is_torch_tensor(groups):
                groups = torch.as_tensor(np.asarray(groups))
            if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
                raise TypeError(f"groups must hold integer class ids, got {groups.dtype}")
            if groups.ndim != 1 or groups.shape[0] != dm.rows:
                raise ValueError(f"groups must have shape [{dm.rows}], got {tuple(groups.shape)}")
            g = groups.to(device=x.device, dtype=torch.int64).contiguous()
        if dm.rows == 0:
            return self
        # One synchronisation to validate before anything is accumulated.
        if g is not None:
            lo, hi = int(g.min()), int(g.max())
            if lo < 0 or hi >= self.n_groups:
                bad = (g < 0) | (g >= self.n_groups)
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"groups must be in [0, {self.n_groups}); {int(bad.sum())} id(s) are outside, "
                    f"first {int(g[i])} at row {i}"
                )
        finite_rows = torch.isfinite(dm.tensor).all(dim=1)
        if not bool(finite_rows.all()):
            bad_rows = (~finite_rows).nonzero()[:, 0]
            raise ValueError(
                f"x contains NaN or Inf in {bad_rows.numel()} row(s) (first at row {int(bad_rows[0])}); "
                "nothing from this chunk was accumulated"
            )
        count, mean, m2 = self._to_device(x.device)
        with torch.cuda.device(x.device):  # the kernels run on the current device
            self._launch_cuda(dm, g, count, mean, m2)
        return self

    def _launch_cuda(self, dm: Any, g: Any, count: Any, mean: Any, m2: Any) -> None:  # pragma: no cover - needs a GPU
        _core.covariance_update_cuda(
            dm.ptr, dm.rows, dm.cols, dm.row_stride, dm.col_stride, dm.dtype_code,
            0 if g is None else g.data_ptr(), self.n_groups,
            count.data_ptr(), mean.data_ptr(), m2.data_ptr(), dm.stream,
        )  # fmt: skip

    def merge(self, other: StreamingCovariance) -> StreamingCovariance:
        """Adds the statistics of ``other`` (same ``n_features`` and ``n_groups``) into ``self``; returns ``self``.

        The result equals one pass over both data sets in any order (Chan et al.'s pairwise update).
        """
        if not isinstance(other, StreamingCovariance):
            raise TypeError(f"merge takes a StreamingCovariance, got {describe(other)}")
        if other.n_features != self.n_features or other.n_groups != self.n_groups:
            raise ValueError(
                f"cannot merge an accumulator with n_features={other.n_features}, n_groups={other.n_groups} into "
                f"one with n_features={self.n_features}, n_groups={self.n_groups}"
            )
        self._to_host()
        if other is self:
            other = StreamingCovariance.from_state_dict(self.state_dict())
        other._to_host()
        _core.covariance_merge(self._count, self._mean, self._m2, other._count, other._mean, other._m2)
        return self

    # -- results -------------------------------------------------------------------------------------------------
    @property
    def count(self) -> np.ndarray:
        """Samples seen per group, ``[G]`` int64 (a copy)."""
        self._to_host()
        return self._count.copy()

    @property
    def mean(self) -> np.ndarray:
        """Per-group mean ``[G, d]`` float64 (a copy); NaN rows for groups with no samples."""
        self._to_host()
        out = self._mean.copy()
        out[self._count == 0] = np.nan
        return out

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Per-group covariance ``[G, d, d]`` float64 (a new array), normalised by ``count - ddof``.

        Groups with ``count <= ddof`` get NaN matrices (like ``np.cov``, without the warning).
        """
        ddof = _as_int(ddof, "ddof", 0)
        self._to_host()
        denom = (self._count - ddof).astype(np.float64)
        cov = _symmetric(self._m2)
        ok = denom > 0
        cov[ok] /= denom[ok][:, None, None]
        cov[~ok] = np.nan
        return cov

    def scatter(self) -> np.ndarray:
        """Per-group sum of centred outer products ``Σ (x-μ)(x-μ)ᵀ`` ``[G, d, d]`` float64 (a new array)."""
        self._to_host()
        return _symmetric(self._m2)

    # -- persistence ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays ``{"count": [G] int64, "mean": [G, d] float64, "m2": [G, d, d] float64}``.

        ``m2`` is the scatter matrix (symmetric). :meth:`from_state_dict` restores the accumulator exactly; the
        arrays can be stored with ``np.savez`` and read back without pickle.
        """
        self._to_host()
        return {"count": self._count.copy(), "mean": self._mean.copy(), "m2": _symmetric(self._m2)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StreamingCovariance:
        """Rebuilds an accumulator from :meth:`state_dict` output; validates keys, shapes and values."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of numpy arrays, got {type(state).__name__}")
        keys = set(state.keys())
        if keys != set(_STATE_KEYS):
            missing = sorted(set(_STATE_KEYS) - keys)
            extra = sorted(str(k) for k in keys - set(_STATE_KEYS))
            raise ValueError(f"state must have exactly the keys {list(_STATE_KEYS)}; missing {missing}, extra {extra}")
        count, mean, m2 = (np.asarray(state[k]) for k in _STATE_KEYS)
        if count.dtype.kind not in "iu":
            raise ValueError(f"state['count'] must hold integers, got dtype {count.dtype}")
        for name, arr in (("mean", mean), ("m2", m2)):
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"state['{name}'] must hold real numbers, got dtype {arr.dtype}")
        if count.ndim != 1 or count.shape[0] < 1:
            raise ValueError(f"state['count'] must have shape [G] with G >= 1, got {count.shape}")
        g = count.shape[0]
        if mean.ndim != 2 or mean.shape[0] != g:
            raise ValueError(f"state['mean'] must have shape [{g}, d], got {mean.shape}")
        d = mean.shape[1]
        if m2.shape != (g, d, d):
            raise ValueError(f"state['m2'] must have shape [{g}, {d}, {d}], got {m2.shape}")
        if (count < 0).any():
            raise ValueError("state['count'] must be non-negative")
        if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
            raise ValueError("state['mean'] and state['m2'] must be finite")
        acc = cls(d, g)
        acc._count[...] = count
        acc._mean[...] = mean
        acc._m2[...] = m2
        return acc

    # -- state placement -----------------------------------------------------------------------------------------
    def _to_host(self, flush: bool = True) -> None:
        """Brings the state to host memory; with ``flush``, also merges the staged rows (needed before any read)."""
        if self._device_state is None:
            if flush:
                self._flush()
            return
        self._device_to_host()

    def _device_to_host(self) -> None:  # pragma: no cover - needs a GPU
        count, mean, m2 = self._device_state
        self._count = count.cpu().numpy()
        self._mean = mean.cpu().numpy()
        self._m2 = m2.cpu().numpy()
        self._device_state = None

    def _to_device(self, device: Any) -> tuple:  # pragma: no cover - needs a GPU
        import torch

        if self._device_state is not None and self._device_state[0].device == device:
            return self._device_state
        self._to_host()
        self._device_state = tuple(
            torch.from_numpy(a).to(device).contiguous() for a in (self._count, self._mean, self._m2)
        )
        return self._device_state
