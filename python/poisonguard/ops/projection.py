"""Fused centre-project-score: the scoring pass of spectral signatures and SPECTRE."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .._interop import as_index_array, compute_dtype, host_matrix, is_torch_tensor


def project_scores(
    x: Any,
    groups: Any,
    means: np.ndarray,
    directions: np.ndarray,
    *,
    que: np.ndarray | None = None,
    return_projections: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Projections of the class-centred rows on per-class directions, their squared norms and QUE scores, in one
    pass over ``x``.

    For row ``r`` of class ``g = groups[r]``: ``p = (x_r − means[g]) @ directions[g]`` (centred in float64,
    multiplied in the compute type), ``score = |p|²`` and, with ``que`` ``[G, k, k]``, ``que_score = p que[g] pᵀ``.

    Parameters
    ----------
    x : ``[n, d]`` numpy array or torch CPU tensor, float16/bfloat16/float32/float64; read in place.
    groups : ``[n]`` integer class ids in ``[0, G)``, or None (every row in class 0).
    means : ``[G, d]`` float64.
    directions : ``[G, d, k]``; converted to the compute type (float32 below float64 input; a copy of ``G·d·k``).
    que : optional ``[G, k, k]`` float64.

    Returns
    -------
    ``(projections [n, k] in the compute type or None, scores [n] float64, que_scores [n] float64 or None)``.
    """
    arr, bf16 = host_matrix(x, "x")
    n, d = arr.shape
    means = np.asarray(means)
    directions = np.asarray(directions)
    if means.ndim != 2 or means.shape[1] != d:
        raise ValueError(f"means must be [G, {d}], got shape {means.shape}")
    n_groups = means.shape[0]
    if directions.ndim != 3 or directions.shape[:2] != (n_groups, d) or directions.shape[2] < 1:
        raise ValueError(f"directions must be [{n_groups}, {d}, k] with k >= 1, got shape {directions.shape}")
    for name, a in (("means", means), ("directions", directions)):
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must be floating point, got {a.dtype}")
    ids = None if groups is None else as_index_array(groups, n, n_groups)
    if groups is None and n_groups != 1 and n:
        raise ValueError(f"groups is required when there are {n_groups} classes")
    k = directions.shape[2]
    if que is not None:
        que = np.asarray(que)
        if que.shape != (n_groups, k, k):
            raise ValueError(f"que must be [{n_groups}, {k}, {k}], got shape {que.shape}")
        que = np.ascontiguousarray(que, dtype=np.float64)
    ct = compute_dtype(arr)
    proj, score, qs = _core.project_scores(
        arr,
        ids,
        np.ascontiguousarray(means, dtype=np.float64),
        np.ascontiguousarray(directions, dtype=ct),
        bool(return_projections),
        que,
        bf16,
    )
    if is_torch_tensor(x):
        import torch

        proj = None if proj is None else torch.from_numpy(proj)
    return proj, score, qs


def segmented_power_pass(
    x: Any,
    groups: Any,
    shift: np.ndarray,
    q: np.ndarray,
    z: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
) -> None:
    """One chunk of a class-segmented subspace-iteration pass, reading ``x`` once: for every class ``g``,
    ``z[g] += Uᵀ (U q[g])``, ``sums[g] += U.sum(0)`` and ``counts[g] += len(U)`` where ``U`` holds the rows of class
    ``g`` minus ``shift[g]`` (the shift is taken in float64; products run in the compute type and are summed in
    float64).

    Parameters
    ----------
    x : ``[n, d]`` numpy array or torch CPU tensor, float16/bfloat16/float32/float64; read in place.
    groups : ``[n]`` integer class ids in ``[0, G)``, or None (every row in class 0).
    shift : ``[G, d]`` float64.
    q : ``[G, d, l]`` in the compute type of ``x`` (float64 for float64 input, float32 otherwise), C-contiguous.
    z, sums, counts : ``[G, d, l]`` float64, ``[G, d]`` float64, ``[G]`` int64 accumulators, updated in place.
    """
    arr, bf16 = host_matrix(x, "x")
    n, d = arr.shape
    shift = np.asarray(shift)
    if shift.ndim != 2 or shift.shape[1] != d:
        raise ValueError(f"shift must be [G, {d}], got shape {shift.shape}")
    n_groups = shift.shape[0]
    if groups is None and n_groups != 1 and n:
        raise ValueError(f"groups is required when there are {n_groups} classes")
    ids = None if groups is None else as_index_array(groups, n, n_groups)
    q = np.asarray(q)
    ct = compute_dtype(arr)
    if q.dtype != ct:
        raise TypeError(f"q must be {np.dtype(ct).name} for {arr.dtype} input, got {q.dtype}")
    if q.ndim != 3 or q.shape[:2] != (n_groups, d) or q.shape[2] < 1:
        raise ValueError(f"q must be [{n_groups}, {d}, l] with l >= 1, got shape {q.shape}")
    _core.segmented_power_pass(arr, ids, np.ascontiguousarray(shift, dtype=np.float64), q, z, sums, counts, bf16)


__all__ = ["project_scores", "segmented_power_pass"]
