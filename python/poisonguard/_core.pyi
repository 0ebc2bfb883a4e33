"""Type stubs for the compiled module (see csrc/bindings.cpp)."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class KernelTypeError(TypeError): ...

def covariance_update(
    x: npt.NDArray[Any],
    groups: npt.NDArray[np.int64] | None,
    count: npt.NDArray[np.int64],
    mean: npt.NDArray[np.float64],
    m2: npt.NDArray[np.float64],
    bf16: bool = False,
    staging: tuple[npt.NDArray[Any], ...] | None = None,
) -> None: ...
def covariance_flush(
    count: npt.NDArray[np.int64],
    mean: npt.NDArray[np.float64],
    m2: npt.NDArray[np.float64],
    staging: tuple[npt.NDArray[Any], ...] | None,
) -> None: ...
def covariance_merge(
    count_a: npt.NDArray[np.int64],
    mean_a: npt.NDArray[np.float64],
    m2_a: npt.NDArray[np.float64],
    count_b: npt.NDArray[np.int64],
    mean_b: npt.NDArray[np.float64],
    m2_b: npt.NDArray[np.float64],
) -> None: ...
def covariance_update_cuda(
    x_ptr: int,
    rows: int,
    cols: int,
    row_stride: int,
    col_stride: int,
    dtype: int,
    groups_ptr: int,
    n_groups: int,
    count_ptr: int,
    mean_ptr: int,
    m2_ptr: int,
    stream: int,
) -> None: ...
def project_scores(
    x: npt.NDArray[Any],
    groups: npt.NDArray[np.int64] | None,
    means: npt.NDArray[np.float64],
    directions: npt.NDArray[Any],
    want_proj: bool = True,
    que: npt.NDArray[np.float64] | None = None,
    bf16: bool = False,
) -> tuple[npt.NDArray[Any] | None, npt.NDArray[np.float64], npt.NDArray[np.float64] | None]: ...
def gram(a: npt.NDArray[Any], bf16: bool = False) -> npt.NDArray[np.float64]: ...
def power_pass(a: npt.NDArray[Any], q: npt.NDArray[Any], bf16: bool = False) -> npt.NDArray[np.float64]: ...
def project(
    a: npt.NDArray[Any], q: npt.NDArray[Any], bf16: bool = False
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]: ...
def matmul(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]: ...
def orthonormalize(q: npt.NDArray[np.float64]) -> None: ...
def eigh_top(c: npt.NDArray[np.float64], k: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def gaussian(seed: int, rows: int, cols: int) -> npt.NDArray[np.float64]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def blas_get_num_threads() -> int: ...
def blas_set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...
def cuda_device_count() -> int: ...
def build_info() -> dict[str, Any]: ...

# -- gradnorm: per-sample ‖G_bᵀ A_b‖_F² (csrc/bind_gradnorm.cpp) -------------------------------------------------
def gradnorm_method(t: int, d_in: int, d_out: int) -> str: ...
def gradnorm_linear(
    a: npt.NDArray[Any],
    g: npt.NDArray[Any],
    method: str,
    weight_sq: npt.NDArray[np.float64],
    bias_sq: npt.NDArray[np.float64] | None = None,
    bf16: bool = False,
) -> str: ...
def gradnorm_linear_cuda(
    a_ptr: int,
    a_shape: tuple[int, int, int],
    a_strides: tuple[int, int, int],
    g_ptr: int,
    g_shape: tuple[int, int, int],
    g_strides: tuple[int, int, int],
    dtype: int,
    method: str,
    weight_sq: int,
    bias_sq: int,
    stream: int,
) -> str: ...
