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
def project_scores_cuda(
    x_ptr: int,
    rows: int,
    cols: int,
    row_stride: int,
    col_stride: int,
    dtype: int,
    groups_ptr: int,
    n_groups: int,
    means_ptr: int,
    dirs_ptr: int,
    k: int,
    proj_ptr: int,
    score_ptr: int,
    que_ptr: int,
    que_score_ptr: int,
    stream: int,
) -> None: ...
def segmented_power_pass(
    x: npt.NDArray[Any],
    groups: npt.NDArray[np.int64] | None,
    shift: npt.NDArray[np.float64],
    q: npt.NDArray[Any],
    z: npt.NDArray[np.float64],
    sums: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    bf16: bool = False,
) -> None: ...
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

# -- trimmed cross-entropy (csrc/bind_trim.cpp) ------------------------------------------------------------------
def trimmed_cross_entropy_forward(
    logits: npt.NDArray[Any],
    target: npt.NDArray[np.int64],
    ignore_index: int,
    k: int,
    eager_grad: npt.NDArray[np.float32] | None = None,
) -> tuple[
    float, npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.uint8], bool
]: ...
def trimmed_cross_entropy_backward_eager(
    target: npt.NDArray[np.int64],
    log_sum: npt.NDArray[np.float64],
    keep: npt.NDArray[np.uint8],
    scale: npt.NDArray[np.float64],
    factor: float,
    grad: npt.NDArray[np.float32],
) -> None: ...
def trimmed_cross_entropy_backward(
    logits: npt.NDArray[Any],
    target: npt.NDArray[np.int64],
    row_max: npt.NDArray[np.float64],
    log_sum: npt.NDArray[np.float64],
    keep: npt.NDArray[np.uint8],
    scale: npt.NDArray[np.float64],
    factor: float,
    grad: npt.NDArray[Any],
) -> None: ...
def trimmed_cross_entropy_forward_cuda(
    ptr: int,
    batch: int,
    classes: int,
    positions: int,
    stride_b: int,
    stride_c: int,
    stride_p: int,
    dtype: int,
    target: int,
    ignore_index: int,
    k: int,
    loss: int,
    row_max: int,
    log_sum: int,
    keep: int,
    total: int,
    stream: int,
) -> None: ...
def trimmed_cross_entropy_backward_cuda(
    ptr: int,
    batch: int,
    classes: int,
    positions: int,
    stride_b: int,
    stride_c: int,
    stride_p: int,
    dtype: int,
    target: int,
    row_max: int,
    log_sum: int,
    keep: int,
    scale: int,
    scale_stride: int,
    factor: float,
    grad: int,
    grad_stride_b: int,
    grad_stride_c: int,
    grad_stride_p: int,
    stream: int,
) -> None: ...

# -- cluster (csrc/bind_cluster.cpp) -------------------------------------------------------------------------------
def uf_union_block(
    parent: npt.NDArray[np.int64],
    size: npt.NDArray[np.int64],
    lims: npt.NDArray[Any],
    ids: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    core: npt.NDArray[np.uint8],
) -> int: ...
def uf_union_edges(parent: npt.NDArray[np.int64], size: npt.NDArray[np.int64], edges: npt.NDArray[np.int64]) -> int: ...
def uf_components(
    parent: npt.NDArray[np.int64], size: npt.NDArray[np.int64], mask: npt.NDArray[np.uint8] | None = None
) -> tuple[npt.NDArray[np.int64], int]: ...
def border_labels(
    lims: npt.NDArray[Any],
    ids: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    core_label: npt.NDArray[np.int64],
    out: npt.NDArray[np.int64],
) -> None: ...

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
