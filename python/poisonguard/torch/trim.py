"""Trimmed cross-entropy for PyTorch: an autograd Function over the fused C++/CUDA kernel, a drop-in module for
``nn.CrossEntropyLoss``, and :func:`trimmed_loss` for any criterion with ``reduction="none"``.

Definitions (shared by all three):

* a *row* is a sample of ``[B, C]`` logits, or one position ``(b, i1, ..., ik)`` of ``[B, C, d1, ..., dk]`` logits
  (as :func:`torch.nn.functional.cross_entropy` treats them); trimming ranks all rows of the call together;
* rows whose target is ``ignore_index`` are excluded first; of the ``n_valid`` others the
  ``k = ceil((1 − trim) · n_valid)`` rows with the smallest loss are kept, equal losses keeping the lower row index;
* ``reduction="mean"``: sum of the kept losses / k; ``"sum"``: their sum; ``"none"``: per-row losses in the target's
  shape with dropped and ignored rows set to 0. With no valid row (empty batch, or every target ignored) "mean" is
  0 with a zero gradient (``F.cross_entropy`` gives NaN there; a NaN would poison a training run);
* ``trim=0`` is plain cross-entropy; ``trim`` must be in ``[0, 1)``;
* on the CPU, logits with NaN or +inf in a valid row raise ValueError (−inf is allowed, e.g. masked classes; a
  target at −inf has an infinite loss, which trimming drops first). On CUDA no error can be raised without waiting
  for the device: such a row gets a NaN loss, ranked above every other, so trimming drops it first and a kept one
  makes the loss NaN.
* second derivatives: ``backward(create_graph=True)`` returns a gradient written with torch operators, which autograd
  can differentiate again (the choice of kept rows is a constant); the default backward uses the fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.trim import (
    TrimState,
    _as_rows,
    _check_target,
    _count_valid,
    check_trim,
    keep_count,
    trimmed_cross_entropy_backward,
    trimmed_cross_entropy_forward,
)

_REDUCTIONS = ("mean", "sum", "none")
# Write the gradient in the forward pass when the logits need one (CPU, float32, unit class stride, more than 16
# classes): each row's (softmax − onehot) / k is written while the row is in cache, so the logits are read and
# exponentiated once in all, and the backward pass has nothing left to do for an upstream gradient of 1 (one scaling
# pass otherwise). The cost: the [n, C] gradient exists from the forward pass on, and is computed even if no backward
# pass follows. False: the backward pass computes it from the logits (a second read and exp).
EAGER_GRADIENT = True


def _check_reduction(reduction: Any) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


class _TrimmedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, trim, reduction, ignore_index, smoothing=0.0):  # type: ignore[override]
        # No zero-filled gradient for the bool mask output (n elements, filled by torch's thread pool at each
        # backward call): backward receives None for it.
        ctx.set_materialize_grads(False)
        if smoothing:  # the kernel's per-row statistics with every valid row kept, then the smoothed selection
            state, x3, t, row_shape = trimmed_cross_entropy_forward(logits, target, 0.0, ignore_index=ignore_index)
            _smooth(state, x3, t, trim, ignore_index, smoothing)
        else:
            eager = EAGER_GRADIENT and ctx.needs_input_grad[0]
            state, x3, t, row_shape = trimmed_cross_entropy_forward(
                logits, target, trim, ignore_index=ignore_index, eager_grad=eager, eager_mean=reduction == "mean"
            )
        ctx.save_for_backward(x3, t, state.row_max, state.log_sum, state.keep, logits)
        ctx.ignore_index = ignore_index
        ctx.smoothing = smoothing
        ctx.eager = state.grad  # the gradient for an upstream gradient of 1, returned by backward (or None)
        ctx.grad_factor = state.grad_factor
        ctx.k = state.k
        ctx.reduction = reduction
        ctx.shape = tuple(logits.shape)
        keep = state.keep.view(row_shape)
        if reduction == "none":
            out = torch.where(state.keep, state.loss, torch.zeros((), dtype=torch.float64, device=state.loss.device))
            out = out.to(logits.dtype).view(row_shape)
        elif isinstance(state.total, float):  # CPU: one tensor made from the float64 value
            value = state.total if reduction == "sum" else (state.total / state.k if state.k else 0.0)
            out = torch.tensor(value, dtype=logits.dtype)
        else:
            total = torch.as_tensor(state.total, dtype=torch.float64, device=logits.device)
            if reduction == "mean":
                total = total / state.k if state.k else torch.zeros((), dtype=torch.float64, device=logits.device)
            out = total.to(logits.dtype)
        ctx.mark_non_differentiable(keep)
        return out, keep

    @staticmethod
    def backward(ctx, grad_out, _grad_keep):  # type: ignore[override]
        eager, ctx.eager = ctx.eager, None  # the eager gradient is handed out once
        if grad_out is None:  # only the mask was used downstream: no gradient
            return None, None, None, None, None, None
        factor = (1.0 / ctx.k if ctx.k else 0.0) if ctx.reduction == "mean" else 1.0
        if torch.is_grad_enabled():  # backward(create_graph=True): a gradient autograd can differentiate again
            return _graph_gradient(ctx, grad_out, factor), None, None, None, None, None
        if eager is not None and grad_out.dim() == 0 and factor / ctx.grad_factor * float(grad_out) == 1.0:
            return eager.view(ctx.shape), None, None, None, None, None  # written for exactly this upstream gradient
        x3, t, row_max, log_sum, keep, _ = ctx.saved_tensors
        state = TrimState(
            loss=None,
            keep=keep,
            total=None,
            k=ctx.k,
            n_valid=-1,
            row_max=row_max,
            log_sum=log_sum,
            grad=eager,
            grad_factor=ctx.grad_factor,
        )
        scale = grad_out.detach().reshape(-1).to(torch.float64)
        grad = trimmed_cross_entropy_backward(x3, t, state, scale, factor)
        if ctx.smoothing:  # (softmax − onehot) → softmax − (1 − ε)·onehot − ε/C on the kept rows, in place
            b, c, p = x3.shape
            coef = (keep.to(torch.float64) * (factor * ctx.smoothing) * scale).view(b, 1, p)
            grad -= (coef / c).to(grad.dtype)
            grad.scatter_add_(1, torch.where(keep, t, 0).view(b, 1, p), coef.to(grad.dtype))
        return grad.view(ctx.shape), None, None, None, None, None


def _keep_smallest(loss: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` smallest entries of the 1-D ``loss`` among the ``valid`` ones (all when None): a
    k-th-value selection, not a sort; equal values keep the lower index, NaN ranks after every number."""
    loss = loss.detach()
    nan = torch.isnan(loss)
    ranked = ~nan if valid is None else valid & ~nan
    idx = ranked.nonzero().squeeze(1)
    keep = torch.zeros(loss.numel(), dtype=torch.bool, device=loss.device)
    m = min(k, idx.numel())
    if m == idx.numel():
        keep[idx] = True
    elif m:
        vals = loss[idx]
        v = torch.kthvalue(vals, m).values
        sel = vals < v
        sel[(vals == v).nonzero().squeeze(1)[: m - int(sel.sum())]] = True
        keep[idx[sel]] = True
    if k > m:  # NaN rows, lowest index first
        keep[(nan if valid is None else valid & nan).nonzero().squeeze(1)[: k - m]] = True
    return keep


def _smooth(state: TrimState, x3: torch.Tensor, t: torch.Tensor, trim: float, ignore_index: int, eps: float) -> None:
    """Turns the kernel's per-row cross-entropy (all valid rows kept) into the label-smoothed loss
    ``(1 − ε)·CE + ε·(lse − mean_j x_j) = CE + ε·(x_t − mean_j x_j)`` (one more read of the logits) and keeps its
    k smallest valid rows, equal losses by row index; updates ``state`` in place."""
    b, _, p = x3.shape
    xd = x3.detach()
    valid = t != ignore_index
    mean = xd.mean(dim=1).reshape(-1).to(torch.float64)  # in the logits' dtype: no float64 copy of [B, C]
    xt = xd.gather(1, torch.where(valid, t, 0).view(b, 1, p)).reshape(-1).to(torch.float64)
    ce = state.loss
    smoothed = torch.where(torch.isinf(ce), ce, ce + eps * (xt - mean))  # a target at −inf: +inf, as torch
    loss = torch.where(valid, smoothed, torch.zeros((), dtype=torch.float64))
    k = keep_count(state.n_valid, trim)
    keep = _keep_smallest(loss, valid, k)
    state.loss, state.keep, state.k = loss, keep, k
    state.total = float(torch.where(keep, loss, torch.zeros((), dtype=torch.float64)).sum())


def _graph_gradient(ctx: Any, grad_out: torch.Tensor, factor: float) -> torch.Tensor:
    """The gradient for ``backward(create_graph=True)``, written with torch operators so that autograd can
    differentiate it again (second derivatives, gradient penalties): the kept rows' cross-entropy weighted by the
    upstream gradient, differentiated with ``create_graph=True``. The selection of kept rows is a constant."""
    _, t, _, _, keep, logits = ctx.saved_tensors
    b = logits.shape[0]
    rows = _as_rows(logits)[0].to(torch.float64)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(
            rows, t.view(b, -1), reduction="none", ignore_index=ctx.ignore_index, label_smoothing=ctx.smoothing
        )  # [B, P]
        w = keep.view(b, -1).to(torch.float64) * factor
        w = w * (grad_out.to(torch.float64).reshape(b, -1) if grad_out.dim() else grad_out.to(torch.float64))
        (grad,) = torch.autograd.grad((loss * w).sum(), logits, create_graph=True)
    return grad


def trimmed_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    trim: float = 0.1,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    return_kept: bool = False,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the ``1 − trim`` share of rows with the smallest loss (fused forward and backward).

    Parameters
    ----------
    logits : ``[B, C]`` or ``[B, C, d1, ...]`` tensor; float16/bfloat16/float32/float64. Read in place through its
        strides (transposed and sliced views included: no copy). float16/bfloat16 on the CPU (e.g. under CPU
        autocast) run through torch operators like ``weight`` below; the fused CPU kernel takes float32/float64.
    target : integer class indices ``[B]`` or ``[B, d1, ...]`` on the same device, each in ``[0, C)`` or
        ``ignore_index`` (converted to contiguous int64 when it is not already: a copy of ``n`` integers).
    trim : share of the valid rows to drop, in ``[0, 1)``.
    reduction : "mean" (default), "sum" or "none" (see the module docstring).
    return_kept : also return the bool mask of kept rows (shape of ``target``).
    weight, label_smoothing : as in :func:`torch.nn.functional.cross_entropy` (class weights ``[C]``, smoothing in
        ``[0, 1]``). With either one set, the rows' losses are torch's (``reduction="none"``, which includes the
        weights), the k smallest are kept as above, and "mean" divides their sum by the sum of the kept rows' class
        weights (torch's weighted mean, restricted to the kept rows): at ``trim=0`` the result is
        ``F.cross_entropy``'s. Label smoothing alone on the CPU runs the fused kernel plus one more read of the
        logits (their row means) and one correction pass over the gradient; class weights, and smoothing on CUDA,
        run torch operators (where a NaN loss ranks last).

    The gradient is ``(softmax − onehot) · grad_output / k`` on the kept rows ("mean") and exactly 0 on the others,
    written in one pass into a tensor like ``logits``; nothing of size ``[n, C]`` is allocated besides it. On the CPU
    (float32, unit class stride, more than 16 classes) it is written by the forward pass when ``logits`` requires a
    gradient (see ``EAGER_GRADIENT``). Its value and gradient match ``F.cross_entropy(reduction="none")`` + selection
    of the k smallest + mean. Second derivatives (``backward(create_graph=True)``) are computed with torch operators.
    On CUDA, validating the targets synchronises once with the host.
    """
    check_trim(trim)
    _check_reduction(reduction)
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"logits and target must be torch tensors, got {type(logits).__name__} and {type(target).__name__}"
        )
    smoothing = _check_label_smoothing(label_smoothing)
    half_cpu = logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16)
    if weight is not None or half_cpu or (smoothing != 0.0 and logits.device.type != "cpu"):
        out, keep = _trimmed_cross_entropy_torch(logits, target, trim, reduction, ignore_index, weight, smoothing)
    else:
        out, keep = _TrimmedCrossEntropy.apply(logits, target, float(trim), reduction, ignore_index, smoothing)
    return (out, keep) if return_kept else out


def _check_label_smoothing(label_smoothing: Any) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def _trimmed_cross_entropy_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    trim: float,
    reduction: str,
    ignore_index: int,
    weight: torch.Tensor | None,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-weighted / label-smoothed case with torch operators (see :func:`trimmed_cross_entropy`)."""
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    x3, row_shape = _as_rows(logits)
    n_classes = x3.shape[1]
    t = _check_target(target, row_shape, logits.device.type == "cuda")
    if t.device != logits.device:
        raise ValueError(f"target is on {t.device} but logits are on {logits.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError(f"weight must be a floating-point torch tensor of {n_classes} class weights")
        if tuple(weight.shape) != (n_classes,):
            raise ValueError(
                f"weight must have shape ({n_classes},) for {n_classes} classes, got {tuple(weight.shape)}"
            )
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")
    n_valid = _count_valid(t, n_classes, ignore_index)
    k = keep_count(n_valid, trim)
    rows = torch.nn.functional.cross_entropy(
        logits,
        t.view(row_shape),
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    ).reshape(-1)
    valid = t != ignore_index
    keep = _keep_smallest(rows, valid, k)
    kept = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        out = kept.view(row_shape)
    elif reduction == "sum":
        out = kept.sum()
    elif not k:
        out = kept.sum() * 0.0
    elif weight is None:
        out = kept.sum() / k
    else:
        w = weight.to(rows.dtype)[torch.where(valid, t, 0)]
        out = kept.sum() / torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)).sum()
    return out, keep.view(row_shape)


class TrimmedCrossEntropyLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` that averages over the ``1 − trim`` share of rows with the
    smallest loss (see :func:`trimmed_cross_entropy`). ``weight`` (class weights, kept as a buffer) and
    ``label_smoothing`` act as in ``nn.CrossEntropyLoss`` (see :func:`trimmed_cross_entropy` for which path runs
    them). After each call, ``kept_`` holds the bool mask of the rows kept in it.
    """

    def __init__(
        self,
        trim: float = 0.1,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if weight is not None and not (isinstance(weight, torch.Tensor) and weight.dim() == 1):
            raise TypeError("weight must be None or a 1-D torch tensor of class weights")
        self.register_buffer("weight", weight)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.trim = check_trim(trim)
        self.ignore_index = int(ignore_index)
        self.reduction = _check_reduction(reduction)
        self.kept_: torch.Tensor | None = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, keep = trimmed_cross_entropy(
            input,
            target,
            self.trim,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            return_kept=True,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
        )
        self.kept_ = keep
        return out

    def extra_repr(self) -> str:
        extra = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        return f"trim={self.trim}, reduction={self.reduction!r}, ignore_index={self.ignore_index}{extra}"


def trimmed_loss(
    per_sample_losses: torch.Tensor, trim: float = 0.1, *, reduction: str = "mean", return_kept: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Trims any per-sample loss (a criterion's output with ``reduction="none"``, any shape: every element is a row).

    Keeps the ``k = ceil((1 − trim) · n)`` smallest values (equal values keep the lower flat index; NaN counts as
    the largest) and reduces them: "mean" (0 for an empty input), "sum", or "none" (same shape, dropped entries 0).
    Differentiable through the kept entries; the selection (a k-th-value selection of the detached values) is a
    constant.
    """
    trim = check_trim(trim)
    _check_reduction(reduction)
    if not isinstance(per_sample_losses, torch.Tensor):
        raise TypeError(f"per_sample_losses must be a torch tensor, got {type(per_sample_losses).__name__}")
    if not (per_sample_losses.dtype.is_floating_point):
        raise TypeError(f"per_sample_losses must be floating point, got {per_sample_losses.dtype}")
    flat = per_sample_losses.reshape(-1)
    n = flat.numel()
    k = keep_count(n, trim)
    keep = _keep_smallest(flat, None, k)
    kept = torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    if reduction == "none":
        out = kept.view(per_sample_losses.shape)
    elif reduction == "sum":
        out = kept.sum()
    else:
        out = kept.sum() / k if k else kept.sum() * 0.0
    keep = keep.view(per_sample_losses.shape)
    return (out, keep) if return_kept else out


__all__ = ["TrimmedCrossEntropyLoss", "trimmed_cross_entropy", "trimmed_loss"]
