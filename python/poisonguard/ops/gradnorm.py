"""Per-sample gradient norms of linear maps without per-sample gradients (the kernels behind GradNormTracker).

For a linear map applied at ``T`` positions of each sample, with inputs ``a [B, T, d_in]`` and output gradients
``g [B, T, d_out]``, the weight gradient of sample ``b`` is ``M_b = g_bᵀ a_b [d_out, d_in]``.
:func:`linear_grad_sqnorms` returns ``‖M_b‖_F²`` (and optionally the bias term ``‖Σ_t g_bt‖²``) without storing
any ``M_b`` for the batch:

* ``"ghost"``: ``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` — two ``T × T`` Gram matrices per sample (BLAS SYRK);
* ``"direct"``: ``M_b`` built a tile of rows at a time (BLAS GEMM) and squared; never ``[B, d_out, d_in]``;
* ``"auto"``: the cheaper of the two by the multiply-add count (:func:`gradnorm_method`):
  ghost ``≈ 1.15·(T²·(d_in + d_out)/2 + T²)`` (two SYRKs and an inner product run slower per multiply-add than one
  GEMM), direct ``≈ (T + 1)·d_in·d_out``. With ``T = 1`` (a plain ``Linear``) the
  ghost form is ``‖a‖²·‖g‖²``.

Products run in float32 for float16/bfloat16/float32 input and float64 for float64 input; the per-sample sums are
float64. Inputs are read in place through their strides (no copy); ``a`` and ``g`` must share a dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from .._interop import DTYPE_CODES, describe, host_array, is_cuda_tensor, is_torch_tensor
from .covariance import _as_int

METHODS = ("auto", "ghost", "direct")


def gradnorm_method(t: int, d_in: int, d_out: int) -> str:
    """``"ghost"`` or ``"direct"``: the form ``method="auto"`` uses for ``T`` positions and a ``d_in → d_out`` map."""
    vals = [_as_int(v, name, 0) for name, v in (("t", t), ("d_in", d_in), ("d_out", d_out))]
    return str(_core.gradnorm_method(*vals))


def _as_3d(x: Any, name: str) -> Any:
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, d] or [B, T, d], got shape {tuple(x.shape)}")
    return x


def linear_grad_sqnorms(a: Any, g: Any, *, method: str = "auto", bias: bool = False) -> tuple[Any, Any, str]:
    """Per-sample squared gradient norms of a linear map (weight, and bias when ``bias``).

    Parameters
    ----------
    a : ``[B, T, d_in]`` or ``[B, d_in]`` (``T = 1``) — the layer inputs; numpy array, torch CPU tensor or CUDA tensor;
        float16, bfloat16 (torch), float32 or float64; any strides.
    g : ``[B, T, d_out]`` or ``[B, d_out]`` — the gradients of the loss w.r.t. the layer outputs, same dtype and
        device as ``a``.
    method : ``"auto"`` (default), ``"ghost"`` or ``"direct"``.
    bias : also return ``‖Σ_t g_t‖²`` per sample.

    Returns
    -------
    ``(weight_sq [B], bias_sq [B] or None, method_used)``: float64, numpy for numpy input, a torch tensor on the
    input's device for torch input. Nothing is scaled: these are the norms of the gradients as captured.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, x in (("a", a), ("g", g)):
        if not (isinstance(x, np.ndarray) or is_torch_tensor(x)):
            raise TypeError(f"{name} must be a numpy array or a torch tensor, got {describe(x)}")
    if is_torch_tensor(a) != is_torch_tensor(g):
        raise TypeError(f"a and g must both be numpy arrays or both torch tensors, got {describe(a)} and {describe(g)}")
    a3, g3 = _as_3d(a, "a"), _as_3d(g, "g")
    if a3.shape[0] != g3.shape[0] or a3.shape[1] != g3.shape[1]:
        raise ValueError(
            f"a [B, T, d_in] and g [B, T, d_out] must agree in B and T, got a {tuple(a.shape)} and g {tuple(g.shape)}"
        )
    if a3.dtype != g3.dtype:
        raise TypeError(f"a and g must have the same dtype, got {a3.dtype} and {g3.dtype}; cast one explicitly")
    n = a3.shape[0]
    if is_torch_tensor(a3):
        import torch

        if a3.device != g3.device:
            raise ValueError(f"a is on {a3.device} but g is on {g3.device}")
        weight = torch.empty(n, dtype=torch.float64, device=a3.device)
        bias_out = torch.empty(n, dtype=torch.float64, device=a3.device) if bias else None
        if is_cuda_tensor(a3):  # pragma: no cover - CUDA device only
            names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
            names[torch.float64] = "float64"
            if a3.dtype not in names:
                raise TypeError(f"a must be a float16, bfloat16, float32 or float64 tensor, got {a3.dtype}")
            stream = torch.cuda.current_stream(a3.device).cuda_stream
            used = _core.gradnorm_linear_cuda(
                a3.data_ptr(),
                tuple(a3.shape),
                tuple(a3.stride()),
                g3.data_ptr(),
                tuple(g3.shape),
                tuple(g3.stride()),
                DTYPE_CODES[names[a3.dtype]],
                method,
                weight.data_ptr(),
                0 if bias_out is None else bias_out.data_ptr(),
                int(stream),
            )
            return weight, bias_out, str(used)
        if a3.device.type != "cpu":
            raise ValueError(f"a is on {a3.device}; CPU and CUDA tensors are supported")
        ah, bf16 = host_array(a3, "a")
        gh, _ = host_array(g3, "g")
        used = _core.gradnorm_linear(
            ah, gh, method, weight.numpy(), None if bias_out is None else bias_out.numpy(), bf16
        )
        return weight, bias_out, str(used)
    ah, _ = host_array(a3, "a")
    gh, _ = host_array(g3, "g")
    weight = np.empty(n, dtype=np.float64)
    bias_out = np.empty(n, dtype=np.float64) if bias else None
    used = _core.gradnorm_linear(ah, gh, method, weight, bias_out, False)
    return weight, bias_out, str(used)


__all__ = ["METHODS", "gradnorm_method", "linear_grad_sqnorms"]
