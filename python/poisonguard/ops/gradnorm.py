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


def gradnorm_method(t: int, d_in: int, d_out: int, *, bookkeeping: bool = False) -> str:
    """``"ghost"`` or ``"direct"``: the form ``method="auto"`` uses for ``T`` positions and a ``d_in → d_out`` map.

    With ``bookkeeping`` the direct form is costed as :func:`linear_grad_bookkeeping` runs it inside
    ``GradNormTracker``: its per-sample gradients also give the weight gradient, so only their squares and sum are
    extra (``≈ 3·d_in·d_out``, against the ghost form's ``1.15·(T²·(d_in + d_out)/2 + T²)``).
    """
    vals = [_as_int(v, name, 0) for name, v in (("t", t), ("d_in", d_in), ("d_out", d_out))]
    return str(_core.gradnorm_method(*vals, bool(bookkeeping)))


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


def _host_pair(x: Any, g: Any, xname: str) -> tuple[Any, Any, bool, bool]:
    """``(x_host, g_host, bf16, torch_out)`` for the host-only book-keeping kernels."""
    for name, v in ((xname, x), ("g", g)):
        if not (isinstance(v, np.ndarray) or is_torch_tensor(v)):
            raise TypeError(f"{name} must be a numpy array or a torch tensor, got {describe(v)}")
    if is_torch_tensor(x) != is_torch_tensor(g):
        raise TypeError(
            f"{xname} and g must both be numpy arrays or both torch tensors, got {describe(x)} and {describe(g)}"
        )
    if x.dtype != g.dtype:
        raise TypeError(f"{xname} and g must have the same dtype, got {x.dtype} and {g.dtype}; cast one explicitly")
    xh, bf16 = host_array(x, xname)
    gh, _ = host_array(g, "g")
    return xh, gh, bf16, is_torch_tensor(x)


def _bk_outputs(
    n: int, d_out: int, d_in: int, dtype: Any, torch_out: bool, bias: bool, bias_grad: bool = False
) -> tuple[Any, Any, Any, Any]:
    """``(weight_sq [n], bias_sq [n] or None, grad_weight [d_out, d_in], grad_bias [d_out] or None)``: float64 norms,
    gradients in the compute type (float64 for float64 input, else float32)."""
    wide = dtype in (np.float64,) or str(dtype) in ("float64", "torch.float64")
    if torch_out:
        import torch

        gdt = torch.float64 if wide else torch.float32
        grad = torch.empty(d_out, d_in, dtype=gdt)
        weight = torch.empty(n, dtype=torch.float64)
        gb = torch.empty(d_out, dtype=gdt) if bias_grad else None
        return weight, (torch.empty(n, dtype=torch.float64) if bias else None), grad, gb
    gdt = np.float64 if wide else np.float32
    grad = np.empty((d_out, d_in), dtype=gdt)
    gb = np.empty(d_out, dtype=gdt) if bias_grad else None
    return np.empty(n, dtype=np.float64), (np.empty(n, dtype=np.float64) if bias else None), grad, gb


def _np(x: Any) -> Any:
    return x if x is None or isinstance(x, np.ndarray) else x.numpy()


def linear_grad_bookkeeping(a: Any, g: Any, *, bias: bool = False, bias_grad: bool = False) -> tuple[Any, ...]:
    """Book-keeping form of the direct method (host only): per-sample squared gradient norms of a linear map AND its
    weight gradient, from one pass over the per-sample gradients ``M_b = g_bᵀ a_b`` (built a tile at a time, never
    stored for the batch).

    ``a [B, T, d_in]`` / ``[B, d_in]`` and ``g [B, T, d_out]`` / ``[B, d_out]`` as in :func:`linear_grad_sqnorms`
    (numpy or torch CPU, one dtype). Returns ``(weight_sq [B], bias_sq [B] or None, grad_weight [d_out, d_in])``:
    float64 norms, and ``grad_weight = Σ_b M_b`` in float32 (float64 for float64 input) — what autograd computes as the
    weight gradient of ``y = a Wᵀ`` for the output gradient ``g``. With ``bias_grad`` a fourth element, the bias
    gradient ``Σ_b Σ_t g_bt [d_out]`` (same dtype as ``grad_weight``, summed in float64), is appended.
    """
    a3, g3 = _as_3d(a, "a"), _as_3d(g, "g")
    if a3.shape[0] != g3.shape[0] or a3.shape[1] != g3.shape[1]:
        raise ValueError(
            f"a [B, T, d_in] and g [B, T, d_out] must agree in B and T, got a {tuple(a.shape)} and g {tuple(g.shape)}"
        )
    ah, gh, bf16, torch_out = _host_pair(a3, g3, "a")
    n, d_out, d_in = a3.shape[0], g3.shape[2], a3.shape[2]
    weight, bias_out, grad, gb = _bk_outputs(n, d_out, d_in, a3.dtype, torch_out, bias, bias_grad)
    _core.gradnorm_linear_bk(ah, gh, _np(grad), _np(weight), _np(bias_out), bf16, _np(gb))
    return (weight, bias_out, grad, gb) if bias_grad else (weight, bias_out, grad)


def _pair(v: Any, n: int, name: str) -> tuple[int, ...]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    if len(vals) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    return tuple(_as_int(u, name, 0) for u in vals)


def conv_grad_bookkeeping(
    x: Any,
    g: Any,
    *,
    kernel_size: Any,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    bias: bool = False,
    bias_grad: bool = False,
) -> tuple[Any, ...]:
    """Book-keeping form for a 1-D or 2-D convolution (host only): per-sample squared norms of the weight gradient (and
    of the bias gradient when ``bias``) and the weight gradient itself, without unfolding the batch's input (each
    sample's patches are packed inside the kernel).

    ``x [B, C_in, W]`` or ``[B, C_in, H, W]`` — the convolution's input before its zero padding ``padding`` (per
    spatial dimension, both sides, as ``F.conv2d``); ``g [B, C_out, *out]`` — the gradient of the output (its
    spatial shape must be the convolution's output shape), same dtype. Returns ``(weight_sq [B], bias_sq [B] or
    None, grad_weight [C_out, C_in/groups, *kernel])`` (float32, float64 for float64 input); with ``bias_grad`` the
    bias gradient ``[C_out]`` (same dtype) is appended.
    """
    nd = x.ndim - 2
    if nd not in (1, 2) or g.ndim != x.ndim:
        raise ValueError(
            f"x must be [B, C, W] or [B, C, H, W] and g [B, C_out, *out] alike, got {tuple(x.shape)} and "
            f"{tuple(g.shape)}"
        )
    k, s, p, d = (
        _pair(v, nd, n)
        for v, n in ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    )
    groups = _as_int(groups, "groups", 1)
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"x and g must agree in the batch size, got {x.shape[0]} and {g.shape[0]}")
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise ValueError(f"kernel_size, stride and dilation must be >= 1, got {k}, {s} and {d}")
    out = tuple((x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd))
    if tuple(g.shape[2:]) != out:
        raise ValueError(f"g has output positions {tuple(g.shape[2:])} but the convolution gives {out}")
    if nd == 1:
        x, g = x[:, :, None, :], g[:, :, None, :]
        k, s, p, d = (1, *k), (1, *s), (0, *p), (1, *d)
    b, c_out = g.shape[0], g.shape[1]
    out_h, out_w = g.shape[2], g.shape[3]
    g3 = g.reshape(b, c_out, out_h * out_w)
    g3 = g3.transpose(1, 2) if is_torch_tensor(g3) else g3.transpose(0, 2, 1)
    xh, gh, bf16, torch_out = _host_pair(x, g3, "x")
    c_in = x.shape[1]
    if c_in % groups or c_out % groups:
        raise ValueError(f"C_in = {c_in} and C_out = {c_out} must be divisible by groups = {groups}")
    weight, bias_out, grad, gb = _bk_outputs(
        b, c_out, c_in // groups * k[0] * k[1], x.dtype, torch_out, bias, bias_grad
    )
    geometry = (k[0], k[1], s[0], s[1], d[0], d[1], p[0], p[1], out_h, out_w, groups)
    _core.gradnorm_conv_bk(xh, gh, geometry, _np(grad), _np(weight), _np(bias_out), bf16, _np(gb))
    grad = grad.reshape(c_out, c_in // groups, *k[2 - nd :])
    return (weight, bias_out, grad, gb) if bias_grad else (weight, bias_out, grad)


def layer_norm_grad_sqnorms(
    x: Any, g: Any, mean: Any, rstd: Any, *, weight: bool = True, bias: bool = True
) -> tuple[Any, Any, Any, Any]:
    """Per-sample affine gradients of a LayerNorm over the last ``N`` features (host only), from its input and the
    statistics its forward computed (``torch.native_layer_norm`` returns them), without recomputing the normalisation.

    ``x``, ``g`` — the input and the output gradient, ``[B, T, N]`` (numpy or torch CPU, one dtype, any strides);
    ``mean``, ``rstd`` — ``B·T`` values each (C-contiguous, float32, float64 for float64 input). For sample ``b`` the
    weight gradient is ``Σ_t g_t ⊙ x̂_t`` with ``x̂_t = (x_t − mean_t)·rstd_t`` and the bias gradient ``Σ_t g_t`` (sums
    over positions in the compute type, as torch's own reduction). Returns ``(weight_sq [B] or None, bias_sq [B] or
    None, grad_weight [N] or None, grad_bias [N] or None)`` — float64 squared norms, and the sums over the batch (the
    layer's affine gradients, float32 or float64) — for the parts asked for by ``weight`` / ``bias``.
    """
    if x.ndim != 3 or tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"x and g must both be [B, T, N], got {tuple(x.shape)} and {tuple(g.shape)}")
    xh, gh, bf16, torch_out = _host_pair(x, g, "x")
    n, feat = x.shape[0], x.shape[2]
    wide = gh.dtype == np.float64
    stat = np.float64 if wide else np.float32
    mh, rh = (np.ascontiguousarray(_np(v.detach()) if is_torch_tensor(v) else v, dtype=stat) for v in (mean, rstd))

    def out(size: int, dt: Any, want: bool) -> Any:
        return np.empty(size, dtype=dt) if want else None

    wsq, bsq = out(n, np.float64, weight), out(n, np.float64, bias)
    gw, gb = out(feat, stat, weight), out(feat, stat, bias)
    _core.gradnorm_layernorm(xh, gh, mh, rh, wsq, bsq, gw, gb, bf16)
    if torch_out:
        import torch

        return tuple(None if v is None else torch.from_numpy(v) for v in (wsq, bsq, gw, gb))
    return wsq, bsq, gw, gb


def embedding_grad_sqnorms(idx: Any, g: Any, *, padding_idx: int | None = None) -> Any:
    """Per-sample squared norm of an Embedding's weight gradient (host only): ``idx [B, T]`` token ids, ``g [B, T, N]``
    the output gradient (numpy or torch CPU, float16/bfloat16/float32/float64, any strides). Within a sample the rows of
    one token id are summed before squaring (repeated tokens are exact); ids equal to ``padding_idx`` get no gradient.
    Returns float64 ``[B]`` (a torch tensor for torch input)."""
    if g.ndim != 3 or tuple(idx.shape) != tuple(g.shape[:2]):
        raise ValueError(f"idx must be [B, T] and g [B, T, N], got {tuple(idx.shape)} and {tuple(g.shape)}")
    gh, bf16 = host_array(g, "g")
    if is_torch_tensor(idx):
        import torch

        ih = idx.detach().to(torch.int64).contiguous().numpy()
    else:
        ih = np.ascontiguousarray(idx, dtype=np.int64)
    out = np.empty(g.shape[0], dtype=np.float64)
    _core.gradnorm_embedding(ih, gh, -1 if padding_idx is None else int(padding_idx), out, bf16)
    if is_torch_tensor(g):
        import torch

        return torch.from_numpy(out)
    return out


__all__ = [
    "METHODS",
    "conv_grad_bookkeeping",
    "embedding_grad_sqnorms",
    "gradnorm_method",
    "layer_norm_grad_sqnorms",
    "linear_grad_bookkeeping",
    "linear_grad_sqnorms",
]
