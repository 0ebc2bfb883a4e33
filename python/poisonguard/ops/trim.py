"""Fused trimmed cross-entropy at the array level: validation and dispatch to the C++/CUDA kernels, no policy.

The loss over ``n`` rows keeps the ``k = ceil((1 − trim) · n_valid)`` rows with the smallest cross-entropy, where
``n_valid`` counts the rows whose target is not ``ignore_index``; equal losses keep the lower row index. The forward
pass computes every row's log-sum-exp and loss and selects the kept rows without sorting; the backward pass writes
``(softmax − onehot) · scale`` on the kept rows and zeros elsewhere, straight into the gradient.

"Rows": for logits ``[B, C]`` a row is a sample; for ``[B, C, d1, ..., dk]`` (as :func:`torch.nn.functional.
cross_entropy` takes them) a row is one position ``(b, i1, ..., ik)``, so ``n = B · d1 ⋯ dk`` and trimming ranks all
positions of the batch together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._interop import DTYPE_CODES, describe, is_cuda_tensor, is_torch_tensor


def keep_count(n_valid: int, trim: float) -> int:
    """``k = ceil((1 − trim) · n_valid)``: the rows kept out of ``n_valid`` (at least 1 when ``n_valid ≥ 1``).

    Computed as ``n_valid − floor(trim · n_valid)``, where a product within a relative 1e-9 of an integer counts as
    that integer, so ``trim=0.3`` of 10 rows drops exactly 3 whatever the rounding of 0.3.
    """
    drop_f = trim * n_valid
    nearest = round(drop_f)
    drop = nearest if abs(drop_f - nearest) <= 1e-9 * max(1.0, drop_f) else math.floor(drop_f)
    return int(n_valid - min(drop, n_valid - 1 if n_valid else 0))


def check_trim(trim: Any) -> float:
    """``trim`` as a float in ``[0, 1)``; TypeError for a non-number, ValueError outside the range."""
    if isinstance(trim, bool) or not isinstance(trim, (int, float, np.integer, np.floating)):
        raise TypeError(f"trim must be a float in [0, 1), got {type(trim).__name__}")
    t = float(trim)
    if not (0.0 <= t < 1.0):
        raise ValueError(f"trim must be in [0, 1) (the share of rows to drop), got {trim}")
    return t


@dataclass
class TrimState:
    """What the forward pass leaves for the backward pass and the caller (numpy arrays, or torch tensors on the
    logits' device).

    ``loss`` ``[n]`` float64 per-row cross-entropy (0 for ignored rows); ``keep`` ``[n]`` bool; ``total`` the sum of
    the kept losses (a float, or a 0-d float64 tensor on CUDA); ``k`` kept rows of ``n_valid`` valid ones;
    ``row_max``, ``log_sum`` ``[n]`` float64, the softmax of row r being ``exp(x − row_max[r] − log_sum[r])``;
    ``grad``: the ``[B, C, P]`` gradient for a unit upstream gradient, ``(softmax − onehot) · grad_factor`` on the
    kept rows and 0 elsewhere, when the forward pass was asked for an eager gradient and could provide one, else None.
    """

    loss: Any
    keep: Any
    total: Any
    k: int
    n_valid: int
    row_max: Any
    log_sum: Any
    grad: Any = None
    grad_factor: float = 1.0


def _as_rows(logits: Any) -> tuple[Any, tuple[int, ...]]:
    """``[B, C, P]`` view of ``[B, C]`` or ``[B, C, d1, ...]`` logits (no copy) and the row shape ``(B, d1, ...)``.

    A ``[B, C, d1, ...]`` input whose trailing dimensions cannot be merged into one strided axis is copied once
    (``torch.reshape`` / ``numpy.reshape``); every layout produced by slicing, transposing ``[B, C]`` or
    ``channels_last`` can be viewed.
    """
    shape = tuple(logits.shape)
    if len(shape) < 2:
        raise ValueError(f"logits must be [B, C] or [B, C, d1, ...], got shape {shape}")
    b, c = shape[0], shape[1]
    if c < 1:
        raise ValueError(f"logits must have at least one class (shape[1] >= 1), got shape {shape}")
    p = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    row_shape = (b, *shape[2:])
    if is_torch_tensor(logits):
        if len(shape) == 2:
            return logits.unsqueeze(2), row_shape
        try:
            return logits.view(b, c, p), row_shape
        except RuntimeError:
            return logits.reshape(b, c, p), row_shape  # documented copy: dims not mergeable into one stride
    if len(shape) == 2:
        return logits[:, :, None], row_shape
    v = logits.view()
    try:
        v.shape = (b, c, p)
    except AttributeError:
        v = logits.reshape(b, c, p)  # documented copy, as above
    return v, row_shape


def _check_target(target: Any, row_shape: tuple[int, ...], cuda: bool) -> Any:
    """Targets as int64 ``[n]``: a C-contiguous numpy array, or a contiguous torch tensor on the logits' device.

    The one copy on this path: integer targets that are not already contiguous int64 are converted (``n``
    integers, small next to the ``n × C`` logits).
    """
    if is_torch_tensor(target):
        import torch

        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold integer class indices, got {target.dtype} (class-probability targets are not "
                "supported)"
            )
        if tuple(target.shape) != row_shape:
            raise ValueError(f"target must have shape {row_shape} for these logits, got {tuple(target.shape)}")
        return target.detach().reshape(-1).to(torch.int64).contiguous()
    if cuda:
        raise TypeError(f"target must be a torch tensor on the logits' device, got {describe(target)}")
    arr = np.asarray(target)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {arr.dtype}")
    if arr.shape != row_shape:
        raise ValueError(f"target must have shape {row_shape} for these logits, got {arr.shape}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


def _count_valid(t: Any, n_classes: int, ignore_index: int) -> int:
    """Valid rows (target != ignore_index); ValueError naming the first target outside ``[0, C)``."""
    if is_torch_tensor(t):
        import torch

        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n_classes))
        n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()  # one synchronisation on CUDA
        if n_bad:
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"target must be in [0, {n_classes}) or ignore_index ({ignore_index}); {n_bad} value(s) are "
                f"outside, first {int(t[i])} at row {i}"
            )
        return int(n_valid)
    if t.size and t.min() >= 0 and t.max() < n_classes:  # the common case, in two reductions
        return int(t.size - np.count_nonzero(t == ignore_index)) if 0 <= ignore_index < n_classes else int(t.size)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_classes))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"target must be in [0, {n_classes}) or ignore_index ({ignore_index}); {int(bad.sum())} value(s) are "
            f"outside, first {t[i]} at row {i}"
        )
    return int(valid.sum())


def _host_logits(x3: Any) -> np.ndarray:
    if is_torch_tensor(x3):
        import torch

        if x3.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"logits must be float32 or float64 on the CPU (float16/bfloat16 on CUDA only), got {x3.dtype}; "
                "convert with logits.float()"
            )
        t = x3.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return t.numpy()
    if not isinstance(x3, np.ndarray):
        raise TypeError(f"logits must be a numpy array or a torch tensor, got {describe(x3)}")
    if x3.dtype not in (np.float32, np.float64) or not x3.dtype.isnative:
        raise TypeError(f"logits must be float32 or float64 (native byte order), got {x3.dtype}")
    return x3


def _cuda_args(t: Any) -> tuple:  # pragma: no cover - needs a GPU
    import torch

    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
    if t.dtype not in names:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {t.dtype}")
    b, c, p = t.shape
    return (t.data_ptr(), b, c, p, t.stride(0), t.stride(1), t.stride(2), DTYPE_CODES[names[t.dtype]])


def _stream(t: Any) -> int:  # pragma: no cover - needs a GPU
    import torch

    return int(torch.cuda.current_stream(t.device).cuda_stream)


def trimmed_cross_entropy_forward(
    logits: Any,
    target: Any,
    trim: float = 0.1,
    *,
    ignore_index: int = -100,
    eager_grad: bool = False,
    eager_mean: bool = False,
) -> tuple[TrimState, Any, Any, tuple[int, ...]]:
    """Forward pass of the trimmed cross-entropy.

    Parameters
    ----------
    logits : ``[B, C]`` or ``[B, C, d1, ...]``; a numpy array or torch CPU tensor of float32/float64, or a CUDA
        tensor of float16/bfloat16/float32/float64. Read in place through its strides (see ``_as_rows`` for the one
        layout that is copied).
    target : integer class indices ``[B]`` or ``[B, d1, ...]`` (numpy or torch on the logits' device), each in
        ``[0, C)`` or equal to ``ignore_index``.
    trim : share of the valid rows to drop, in ``[0, 1)``.
    eager_grad : on the CPU, for float32 logits with unit class stride and more than 16 classes, also write the
        gradient for a unit upstream gradient into a new buffer (``state.grad``), each row while it is in cache: one
        read of the logits and one exp per element in all ("fused" forward + backward);
        :func:`trimmed_cross_entropy_backward` then returns it as it is (upstream gradient 1) or scales it in place.
        Ignored where unavailable.
    eager_mean : the eager gradient is that of the mean of the kept losses (factor ``1/k``), not of their sum.

    Returns
    -------
    ``(state, logits3, target_flat, row_shape)``: the :class:`TrimState`, the ``[B, C, P]`` view of the logits and the
    int64 ``[n]`` targets the kernels read (keep them for :func:`trimmed_cross_entropy_backward`), and the row
    shape ``(B, d1, ...)``.

    Raises ValueError for a trim outside ``[0, 1)``, a bad shape, a target out of range, or a valid row whose logits
    hold NaN or +inf (−inf is allowed: a target at −inf gives an infinite loss); TypeError for wrong dtypes.
    """
    trim = check_trim(trim)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not (isinstance(logits, np.ndarray) or is_torch_tensor(logits)):
        raise TypeError(f"logits must be a numpy array or a torch tensor, got {describe(logits)}")
    cuda = is_cuda_tensor(logits)
    x3, row_shape = _as_rows(logits)
    n_classes = x3.shape[1]
    t = _check_target(target, row_shape, cuda)
    if cuda:  # pragma: no cover - needs a GPU
        if t.device != logits.device:
            raise ValueError(f"target is on {t.device} but logits are on {logits.device}")
        n_valid = _count_valid(t, n_classes, ignore_index)
        k = keep_count(n_valid, trim)
        return _forward_cuda(x3, t, ignore_index, k, n_valid), x3, t, row_shape
    if is_torch_tensor(t) and t.device.type != "cpu":
        raise ValueError(f"target is on {t.device} but logits are on the CPU")
    arr = _host_logits(x3)
    t_np = t.numpy() if is_torch_tensor(t) else t
    n_valid = _count_valid(t_np, n_classes, ignore_index)
    k = keep_count(n_valid, trim)
    grad = np.empty_like(arr) if eager_grad and arr.dtype == np.float32 and arr.strides[1] == 4 else None
    grad_factor = 1.0 / k if eager_mean and k else 1.0
    total, loss, row_max, log_sum, keep, eager = _core.trimmed_cross_entropy_forward(
        arr, t_np, ignore_index, k, grad, grad_factor
    )
    grad = grad if eager else None
    keep = keep.view(np.bool_)
    if is_torch_tensor(logits):
        import torch

        loss, row_max, log_sum = (torch.from_numpy(a) for a in (loss, row_max, log_sum))
        keep = torch.from_numpy(keep)
        grad = None if grad is None else torch.from_numpy(grad)
    state = TrimState(
        loss=loss,
        keep=keep,
        total=float(total),
        k=k,
        n_valid=n_valid,
        row_max=row_max,
        log_sum=log_sum,
        grad=grad,
        grad_factor=grad_factor,
    )
    return state, x3, t, row_shape


def _forward_cuda(x3: Any, t: Any, ignore_index: int, k: int, n_valid: int) -> TrimState:  # pragma: no cover
    import torch

    if not _core.built_with_cuda():
        raise RuntimeError("poisonguard was built without CUDA; reinstall with POISONGUARD_CUDA=ON and nvcc available")
    n = t.shape[0]
    dev = x3.device
    f64 = {"dtype": torch.float64, "device": dev}
    loss, row_max, log_sum = torch.empty(n, **f64), torch.empty(n, **f64), torch.empty(n, **f64)
    keep = torch.empty(n, dtype=torch.uint8, device=dev)
    total = torch.empty(1, **f64)
    xd = x3.detach()
    with torch.cuda.device(dev):  # temporaries and launches on the logits' device
        _core.trimmed_cross_entropy_forward_cuda(
            *_cuda_args(xd),
            t.data_ptr(),
            ignore_index,
            k,
            loss.data_ptr(),
            row_max.data_ptr(),
            log_sum.data_ptr(),
            keep.data_ptr(),
            total.data_ptr(),
            _stream(xd),
        )
    return TrimState(
        loss=loss,
        keep=keep.view(torch.bool),
        total=total[0],
        k=k,
        n_valid=n_valid,
        row_max=row_max,
        log_sum=log_sum,
    )


def trimmed_cross_entropy_backward(x3: Any, t: Any, state: TrimState, scale: Any, factor: float) -> Any:
    """Gradient of the trimmed loss with respect to the ``[B, C, P]`` logits view ``x3`` (from the forward pass).

    ``grad[r, j] = (softmax(x_r)_j − [j == t_r]) · factor · scale_r`` on the kept rows, 0 elsewhere, where ``scale``
    is one float64 value (``[1]``) or one per row (``[n]``) — a numpy array, or a float64 tensor on the logits'
    device. Returns a new array/tensor of ``x3``'s shape and dtype (``empty_like``: a dense input's layout is kept).
    """
    if is_cuda_tensor(x3):  # pragma: no cover - needs a GPU
        import torch

        xd = x3.detach()
        grad = torch.empty_like(xd)
        s = scale.to(device=xd.device, dtype=torch.float64).contiguous()
        with torch.cuda.device(xd.device):
            _core.trimmed_cross_entropy_backward_cuda(
                *_cuda_args(xd),
                t.data_ptr(),
                state.row_max.data_ptr(),
                state.log_sum.data_ptr(),
                state.keep.data_ptr(),
                s.data_ptr(),
                0 if s.numel() == 1 else 1,
                float(factor),
                grad.data_ptr(),
                grad.stride(0),
                grad.stride(1),
                grad.stride(2),
                _stream(xd),
            )
        return grad
    arr = _host_logits(x3)
    as_np = (lambda a: a.numpy()) if is_torch_tensor(x3) else (lambda a: a)
    s = np.ascontiguousarray(as_np(scale) if is_torch_tensor(scale) else scale, dtype=np.float64).reshape(-1)
    t_np = t.numpy() if is_torch_tensor(t) else t
    keep = as_np(state.keep).view(np.uint8)
    if state.grad is not None:  # written by the forward pass: scaled in place if needed (it can be used once)
        grad = as_np(state.grad)
        state.grad = None
        _core.trimmed_cross_entropy_backward_eager(keep, s, float(factor) / state.grad_factor, grad)
    else:
        grad = np.empty_like(arr)
        _core.trimmed_cross_entropy_backward(
            arr, t_np, as_np(state.row_max), as_np(state.log_sum), keep, s, float(factor), grad
        )
    if is_torch_tensor(x3):
        import torch

        return torch.from_numpy(grad)
    return grad


__all__ = ["TrimState", "check_trim", "keep_count", "trimmed_cross_entropy_backward", "trimmed_cross_entropy_forward"]
