"""Array interop: how numpy arrays and torch tensors reach the kernels without copies.

Host data is handed to ``_core`` as a numpy array (a torch CPU tensor becomes a ``.numpy()`` view; bfloat16, which
numpy lacks, travels as an ``int16`` view plus a flag). CUDA tensors are described by pointer, shape, strides (in
elements), dtype code and the current CUDA stream.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

# dtype codes shared with csrc/common/dtype.h (pg::DType).
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _torch():
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def describe(x: Any) -> str:
    """A short description of an argument for error messages."""
    if isinstance(x, np.ndarray) or is_torch_tensor(x):
        dev = f", device={x.device}" if is_torch_tensor(x) else ""
        return f"{type(x).__name__}(shape={tuple(x.shape)}, dtype={x.dtype}{dev})"
    return type(x).__name__


@dataclass(frozen=True)
class DeviceMatrix:
    """A 2-D CUDA tensor as the CUDA kernels see it."""

    tensor: Any
    ptr: int
    rows: int
    cols: int
    row_stride: int
    col_stride: int
    dtype_code: int
    stream: int


def is_cuda_tensor(x: Any) -> bool:
    return is_torch_tensor(x) and x.device.type == "cuda"


def _check_2d(shape: tuple, name: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {tuple(shape)}")


def host_matrix(x: Any, name: str = "x") -> tuple[np.ndarray, bool]:
    """Returns ``(array, is_bf16)`` viewing the same memory as ``x`` (no copy).

    Accepts numpy arrays (including memmaps) of float16/float32/float64 and torch CPU tensors of those dtypes or
    bfloat16. Raises TypeError for other types/dtypes and ValueError for a shape that is not 2-D.
    """
    return host_array(x, name, check_shape=lambda shape: _check_2d(shape, name))


def host_array(x: Any, name: str = "x", check_shape: Any = None) -> tuple[np.ndarray, bool]:
    """``host_matrix`` for any number of dimensions: ``check_shape(shape)`` (optional) validates the shape."""
    if isinstance(x, np.ndarray):
        if check_shape is not None:
            check_shape(x.shape)
        if x.dtype.type not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must have a floating dtype (float16, float32 or float64), got {x.dtype}; "
                "convert it explicitly (e.g. x.astype(np.float32))"
            )
        if not x.dtype.isnative:
            raise TypeError(f"{name} has non-native byte order ({x.dtype}); use x.astype(x.dtype.newbyteorder('='))")
        return x, False
    if is_torch_tensor(x):
        torch = _torch()
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; this operation takes host arrays or CPU tensors here")
        if check_shape is not None:
            check_shape(tuple(x.shape))
        t = x.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), True
        if t.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return t.numpy(), False
    raise TypeError(
        f"{name} must be a numpy array or a torch tensor, got {describe(x)}; "
        "wrap Python sequences with np.asarray(..., dtype=np.float32)"
    )


def device_matrix(x: Any, name: str = "x") -> DeviceMatrix:  # pragma: no cover - CUDA device only
    """Describes a 2-D CUDA tensor for the CUDA kernels (no copy)."""
    torch = _torch()
    _check_2d(tuple(x.shape), name)
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
    if x.dtype not in names:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    t = x.detach()
    stream = torch.cuda.current_stream(t.device).cuda_stream
    return DeviceMatrix(
        tensor=t,
        ptr=t.data_ptr(),
        rows=t.shape[0],
        cols=t.shape[1],
        row_stride=t.stride(0),
        col_stride=t.stride(1),
        dtype_code=DTYPE_CODES[names[x.dtype]],
        stream=int(stream),
    )


def compute_dtype(arr: np.ndarray) -> np.dtype:
    """float64 for float64 input, float32 for everything narrower (the kernels' compute type)."""
    return np.dtype(np.float64) if arr.dtype == np.float64 else np.dtype(np.float32)


def as_index_array(groups: Any, n: int, n_groups: int, name: str = "groups") -> np.ndarray:
    """Validates class ids and returns them as a C-contiguous int64 numpy array.

    This is the one documented copy on the host path: ids that are not already int64 and contiguous are converted
    (``n`` integers, small next to the ``n × d`` data).
    """
    if is_torch_tensor(groups):
        if groups.device.type != "cpu":
            raise ValueError(f"{name} is on {groups.device} but the data is on the host")
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == _torch().bool:
            raise TypeError(f"{name} must hold integer class ids, got {groups.dtype}")
        arr = groups.detach().numpy()
    else:
        arr = np.asarray(groups)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n_samples], got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but x has {n} rows; they must match")
    if n:
        bad = (arr < 0) | (arr >= n_groups)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name} must be in [0, {n_groups}); {int(bad.sum())} id(s) are outside, first {arr[i]} at row {i}"
            )
    return np.ascontiguousarray(arr, dtype=np.int64)
