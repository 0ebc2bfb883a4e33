"""Fused centre-project-score: the scoring pass of spectral signatures and SPECTRE."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .._interop import as_index_array, compute_dtype, device_matrix, host_matrix, is_cuda_tensor, is_torch_tensor


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
    x : ``[n, d]`` numpy array or torch tensor (CPU or CUDA), float16/bfloat16/float32/float64; read in place. A
        CUDA tensor runs the CUDA kernel on its device and current stream; the outputs are then CUDA tensors.
    groups : ``[n]`` integer class ids in ``[0, G)``, or None (every row in class 0).
    means : ``[G, d]`` float64.
    directions : ``[G, d, k]``; converted to the compute type (float32 below float64 input; a copy of ``G·d·k``).
    que : optional ``[G, k, k]`` float64.

    Returns
    -------
    ``(projections [n, k] in the compute type or None, scores [n] float64, que_scores [n] float64 or None)``.
    """
    if is_cuda_tensor(x):
        return _project_scores_cuda(x, groups, means, directions, que, return_projections)
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


def _project_scores_cuda(x, groups, means, directions, que, want_proj):  # pragma: no cover - needs a GPU
    import torch

    if not _core.built_with_cuda():
        raise RuntimeError(
            "x is a CUDA tensor but poisonguard was built without CUDA; reinstall with POISONGUARD_CUDA=ON "
            "(nvcc on PATH) or pass x.cpu()"
        )
    dm = device_matrix(x, "x")
    n, d = dm.rows, dm.cols
    dev = x.device
    means = torch.as_tensor(np.asarray(means) if not torch.is_tensor(means) else means)
    directions = torch.as_tensor(np.asarray(directions) if not torch.is_tensor(directions) else directions)
    if means.ndim != 2 or means.shape[1] != d:
        raise ValueError(f"means must be [G, {d}], got shape {tuple(means.shape)}")
    n_groups = means.shape[0]
    if directions.ndim != 3 or tuple(directions.shape[:2]) != (n_groups, d) or directions.shape[2] < 1:
        raise ValueError(f"directions must be [{n_groups}, {d}, k] with k >= 1, got shape {tuple(directions.shape)}")
    k = directions.shape[2]
    if k > 256:
        raise ValueError(f"the CUDA kernel takes at most 256 directions per class, got {k}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    means_d = means.to(device=dev, dtype=torch.float64).contiguous()
    dirs_d = directions.to(device=dev, dtype=ct).contiguous()
    if groups is None:
        if n_groups != 1 and n:
            raise ValueError(f"groups is required when there are {n_groups} classes")
        g = None
    else:
        g = torch.as_tensor(groups).to(device=dev, dtype=torch.int64).contiguous()
        if g.ndim != 1 or g.shape[0] != n:
            raise ValueError(f"groups must have shape [{n}], got {tuple(g.shape)}")
        if n and (int(g.min()) < 0 or int(g.max()) >= n_groups):
            raise ValueError(f"groups must be in [0, {n_groups})")
    que_d = None
    if que is not None:
        que_d = torch.as_tensor(np.asarray(que) if not torch.is_tensor(que) else que)
        if tuple(que_d.shape) != (n_groups, k, k):
            raise ValueError(f"que must be [{n_groups}, {k}, {k}], got shape {tuple(que_d.shape)}")
        que_d = que_d.to(device=dev, dtype=torch.float64).contiguous()
    proj = torch.empty((n, k), device=dev, dtype=ct) if want_proj else None
    score = torch.empty(n, device=dev, dtype=torch.float64)
    qs = torch.empty(n, device=dev, dtype=torch.float64) if que_d is not None else None
    with torch.cuda.device(dev):
        _core.project_scores_cuda(
            dm.ptr, n, d, dm.row_stride, dm.col_stride, dm.dtype_code,
            0 if g is None else g.data_ptr(), n_groups, means_d.data_ptr(), dirs_d.data_ptr(), k,
            0 if proj is None else proj.data_ptr(), score.data_ptr(),
            0 if que_d is None else que_d.data_ptr(), 0 if qs is None else qs.data_ptr(), dm.stream,
        )  # fmt: skip
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
