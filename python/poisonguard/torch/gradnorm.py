"""Per-sample gradient norms from one ordinary backward: :class:`GradNormTracker`.

Each tracked layer keeps a reference to its input (no copy: autograd keeps the same tensor for the weight gradient
anyway); during the backward the layer's output gradient arrives (in a hook on the output tensor, or in the backward
of the book-keeping function below) and that layer's per-sample squared norms are computed at once, then the input is
dropped, so nothing outlives the backward and the per-sample gradients of the batch are never stored.

Linear and Conv layers are handled by their forward, swapped (an instance attribute) while the tracker is entered
and put back on exit; per call the cost model (:func:`poisonguard.ops.gradnorm_method` with ``bookkeeping=True``)
picks one of two forms, see ``tracker.methods``:

* ``"direct"`` as book-keeping (CPU, float32/float64, weight trainable, no autocast): the layer runs as an
  ``autograd.Function`` whose forward is ``F.linear`` / ``F.conv*d`` and whose backward builds each sample's weight
  gradient ``G_bᵀ A_b`` a tile at a time (:func:`poisonguard.ops.linear_grad_bookkeeping`,
  :func:`poisonguard.ops.conv_grad_bookkeeping`: a convolution's patches are packed per sample, never unfolded for
  the batch), squares it for the norm AND sums it into the weight gradient returned to autograd, which therefore does
  not compute that gradient itself (the bias gradient comes from the same pass); the input gradient is torch's.
  ``.grad``, parameter hooks and gradient accumulation work as in a plain step (equal up to float rounding). A
  backward run after the block still gets plain gradients (and records nothing). Cheaper than ghost wherever a sample
  has many positions (``T > 1``: sequence Linear, convolutions);
* ``"ghost"`` (or the kernels' direct form where book-keeping cannot run): the plain forward, and a hook on the output
  gradient computes the norms with :func:`poisonguard.ops.linear_grad_sqnorms` — ``Linear`` inputs
  ``[B, ..., d_in]`` seen as ``[B, T, d_in]``; ``Conv1d`` / ``Conv2d`` on the unfolded input (``[B, L,
  C_in/groups·k]`` per group of channels; stride, padding, padding mode, dilation and groups honoured). Cheapest for
  ``T = 1`` (``‖a‖²‖g‖²``).

Other layers:

* ``Embedding`` — the gradient rows of one sample are summed per token id before squaring, so repeated tokens are
  exact (``padding_idx`` rows get no gradient, as in torch); on CPU one pass per sample over its positions sorted by
  id (:func:`poisonguard.ops.embedding_grad_sqnorms`);
* ``LayerNorm`` — per-sample affine gradients ``Σ_positions g·x̂`` and ``Σ g``: on CPU (float32/float64, no autocast)
  its forward is swapped for ``torch.native_layer_norm`` in an ``autograd.Function`` that keeps the mean and 1/std, and
  whose backward computes the per-sample sums from them in one pass (:func:`poisonguard.ops.layer_norm_grad_sqnorms`)
  and returns their batch sums as the weight and bias gradients (the input gradient is torch's); elsewhere ``x̂`` is
  recomputed from the captured input in a hook;
* ``GroupNorm`` — the same sums, ``x̂`` recomputed from the captured input;
* ``RMSNorm`` (torch >= 2.4) — the weight's per-sample sum ``Σ_positions g·x̂`` with ``x̂ = x / rms(x)`` recomputed
  from the captured input (``eps=None`` means the input dtype's machine epsilon, as in torch);
* ``MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` etc.) — while the tracker is entered its forward
  is replaced by the same computation written with three ``F.linear`` input projections (tracked like Linear layers,
  book-keeping included; they are the row blocks of ``in_proj_weight``) and ``out_proj`` called as a module; the
  original forward is put back on exit. Batch-first or sequence-first, kdim/vdim, masks and attention weights are
  supported; ``add_bias_kv`` / ``add_zero_attn`` are not. The outputs match torch's to float rounding (~1e-7), not
  bitwise.

Anything else that owns trainable parameters raises ``ValueError`` naming it when the tracker is created (BatchNorm
mixes samples through its batch statistics, so its "per-sample gradient" is not defined). Frozen parameters
(``requires_grad=False``) are skipped. A parameter shared between modules, or a module called more than once in one
forward, is refused (the per-sample norm of a sum of contributions is not the sum of their norms), with one
exception: an ``Embedding`` weight tied to a ``Linear`` weight (an input embedding and an output head, as in GPT-2).
There the tied weight's per-sample gradient is ``E + H`` (the embedding's use and the head's), and the cross term
``2⟨E, H⟩ = 2 Σ_t g_t · Σ_s u_s[tok_t] h_s`` (``g`` the embedding's output gradients, ``u`` and ``h`` the head's output
gradients and inputs) is formed from one gather and one batched product of size ``[B, T, d]``, so ``norms`` is exact.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gradnorm import (
    METHODS,
    conv_grad_bookkeeping,
    embedding_grad_sqnorms,
    gradnorm_method,
    layer_norm_grad_sqnorms,
    linear_grad_bookkeeping,
    linear_grad_sqnorms,
)

_REDUCTIONS = ("mean", "sum")
_RMS_NORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # torch >= 2.4
_SUPPORTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    *_RMS_NORM,
    nn.MultiheadAttention,
)
_MHA_PARAMS = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}


def _trainable(p: Any) -> bool:
    return p is not None and p.requires_grad


def _unsupported_message(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        why = (
            "BatchNorm mixes the samples of a batch through its batch statistics, so a sample's gradient depends on "
            "the others and per-sample gradient norms are not defined; use GroupNorm/LayerNorm, or freeze its affine "
            "parameters (requires_grad_(False)), or put it in eval mode and freeze it"
        )
    elif isinstance(module, nn.MultiheadAttention):
        why = (
            "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported (the plain and "
            "kdim/vdim forms are)"
        )
    else:
        names = ", ".join(t.__name__ for t in _SUPPORTED)
        why = f"supported layers with trainable parameters are {names}"
    return f"GradNormTracker cannot track module '{name}' ({kind}): {why}"


class GradNormTracker:
    """Context manager: per-sample L2 norms of the full gradient over the trainable parameters of ``model``, from the
    one ordinary backward of a training step.

    Parameters
    ----------
    model : the ``nn.Module``; every submodule that owns trainable parameters must be one of ``Linear``, ``Conv1d``,
        ``Conv2d``, ``Embedding``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``MultiheadAttention`` (else
        ``ValueError`` when the tracker is created). Inputs are batch-first (sequence-first MultiheadAttention inputs
        are fine).
    loss_reduction : ``"mean"`` (default) when the loss is the mean of ``B`` per-sample losses: the captured output
        gradients are then ``1/B`` of the per-sample ones and the norms are multiplied by ``B``; ``"sum"`` when the loss
        is their sum (norms as captured).
    method : ``"auto"`` (default; per layer by the cost model), ``"ghost"`` or ``"direct"`` (book-keeping where it can
        run) for the linear maps.

    After the backward (inside the ``with`` block or after it): ``norms`` — float64 tensor ``[B]`` on the model's
    device; ``layer_norms`` — module name → ``[B]``; ``methods`` — module name → ``"ghost"`` / ``"direct"`` for the
    linear maps (Linear, Conv), ``"exact"`` for the others. A new forward after a backward starts a new step (the
    previous norms are cleared). The backward must run while the tracker is entered; the hooks are removed and the
    swapped forwards restored on exit, also when the block raises. The norms are those of the step's first backward:
    ``backward(create_graph=True)`` (or ``autograd.grad`` with it) gives gradients that can be differentiated again,
    and a later backward over the same forward (a gradient penalty, a second ``retain_graph`` pass) adds to ``.grad``
    as usual but not to the norms.

    Example::

        with GradNormTracker(model) as tracker:
            loss = F.cross_entropy(model(x), y)  # mean over the batch
            loss.backward()
        per_sample = tracker.norms  # [B]
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", method: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got {loss_reduction!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.method = method
        self._handles: list[Any] = []
        self._active = False
        self.reset()
        self._layers = self._collect()

    # -- set-up -------------------------------------------------------------------------------------------------------
    def _collect(self) -> list[tuple[str, nn.Module]]:
        owners: dict[int, tuple[str, nn.Module, str]] = {}  # parameter -> (module name, module, parameter name)
        seen: dict[int, str] = {}
        layers = []
        self._tie_head_of: dict[str, str] = {}  # embedding name -> the Linear sharing its weight
        self._tie_emb_of: dict[str, tuple[str, nn.Embedding]] = {}  # Linear name -> the embedding
        self._attention: list[tuple[str, nn.MultiheadAttention]] = []
        for name, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, nn.MultiheadAttention) and any(p.requires_grad for p in module.parameters()):
                # its forward must be replaced even when only out_proj trains: out_proj is applied functionally
                if module.bias_k is not None or module.add_zero_attn:
                    raise ValueError(_unsupported_message(name or "<model>", module))
                self._attention.append((name or "<model>", module))
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            label = name or "<model>"
            if id(module) in seen:
                raise ValueError(
                    f"GradNormTracker: module '{seen[id(module)]}' is registered again as '{label}' (shared weights); "
                    "per-sample norms of shared parameters are not supported"
                )
            seen[id(module)] = label
            for pname, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if id(p) in owners:
                    other_label, _, other_pname = owners[id(p)]
                    pair = _embedding_head_tie((label, module, pname), owners[id(p)])
                    if pair is None or pair[0][0] in self._tie_head_of or pair[1] in self._tie_emb_of:
                        raise ValueError(
                            f"GradNormTracker: parameter '{label}.{pname}' is shared with '{other_label}."
                            f"{other_pname}' (tied weights); per-sample norms of shared parameters are supported "
                            "only for the weight of one Embedding tied to the weight of one Linear (an input "
                            "embedding and an output head)"
                        )
                    (emb_name, emb), head = pair
                    self._tie_head_of[emb_name], self._tie_emb_of[head] = head, (emb_name, emb)
                    continue
                owners[id(p)] = (label, module, pname)
            if not isinstance(module, _SUPPORTED):
                raise ValueError(_unsupported_message(label, module))
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                raise ValueError(
                    f"GradNormTracker cannot track module '{label}' (Embedding with scale_grad_by_freq=True): its "
                    "gradient scaling depends on the token counts of the whole batch"
                )
            allowed = _MHA_PARAMS if isinstance(module, nn.MultiheadAttention) else {"weight", "bias"}
            extra = {n for n, _ in module.named_parameters(recurse=False)} - allowed
            if extra:
                raise ValueError(
                    f"GradNormTracker cannot track module '{label}': unexpected parameters {sorted(extra)}"
                )
            if not isinstance(module, nn.MultiheadAttention):
                layers.append((label, module))
        return layers

    def __enter__(self) -> GradNormTracker:
        if self._active:
            raise RuntimeError("this GradNormTracker is already entered")
        self.reset()
        self._swapped: list[tuple[nn.Module, Any]] = []
        try:
            for name, module in self._layers:
                if isinstance(module, _LINEAR_MAPS):
                    self._swap_forward(module, _make_map_forward(self, name))
                elif isinstance(module, nn.LayerNorm):
                    self._swap_forward(module, _make_layer_norm_forward(self, name))
                else:
                    self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))
            for name, module in self._attention:
                self._swap_forward(module, _make_attention_forward(self, name))
        except BaseException:
            self.__exit__()
            raise
        self._active = True
        return self

    def _swap_forward(self, module: nn.Module, forward: Any) -> None:
        """Sets an instance-level forward, remembering the one the instance had (normally none: the class's)."""
        self._swapped.append((module, module.__dict__.get("forward", _NO_FORWARD)))
        module.forward = types.MethodType(forward, module)

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, previous in reversed(getattr(self, "_swapped", [])):
            if previous is _NO_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._swapped = []
        self._pending.clear()

    def reset(self) -> None:
        """Forgets the norms of the previous step."""
        self._sq: dict[str, torch.Tensor] = {}
        self.methods: dict[str, str] = {}
        self._pending: dict[str, bool] = {}
        self._batch: int | None = None
        self._backward_started = False
        self._task: int | None = None  # the autograd graph task of the step's first recorded gradient
        self._cross: dict[str, torch.Tensor] = {}  # tied weights: 2⟨E_b, H_b⟩ per embedding name
        self._tie_tokens: dict[str, torch.Tensor] = {}  # embedding name -> this step's token ids
        self._tie_stash: dict[str, tuple[str, torch.Tensor]] = {}  # embedding name -> ("R" | "G", [B, T, d])

    # -- results ------------------------------------------------------------------------------------------------------
    def _scale(self) -> float:
        return float(self._batch) if self.loss_reduction == "mean" and self._batch else 1.0

    @property
    def layer_norms(self) -> dict[str, torch.Tensor]:
        """Module name → per-sample L2 norm ``[B]`` (float64) of the gradient of that module's trainable parameters.

        For an Embedding whose weight is tied to a Linear's, each entry is the gradient through that module's own use
        of the weight; ``norms`` adds the cross term of the two uses (so it is not the root of the sum of squares of
        these entries)."""
        s = self._scale()
        return {name: sq.sqrt() * s for name, sq in self._sq.items()}

    @property
    def norms(self) -> torch.Tensor:
        """Per-sample L2 norm ``[B]`` (float64) of the gradient over all tracked trainable parameters."""
        if not self._sq:
            raise RuntimeError(
                "no per-sample norms yet: run a forward and a backward inside the tracker's `with` block"
            )
        total = None
        for sq in [*self._sq.values(), *self._cross.values()]:
            total = sq.clone() if total is None else total + sq
        return total.clamp_min(0.0).sqrt() * self._scale()

    # -- hooks --------------------------------------------------------------------------------------------------------
    def _make_forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not self._active or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            self._begin_call(name, inputs[0])
            x = inputs[0]
            self._pending[name] = True
            if name in self._tie_head_of:
                self._tie_tokens[name] = x.detach()
            self._hook_output(name, output, x, lambda xd, g: self._layer_sq(name, module, xd, g))

        return hook

    def _hook_output(self, name: str, y: torch.Tensor, x: torch.Tensor, sq: Any) -> torch.Tensor:
        """Adds ``sq(x, g)`` (x detached, g = the gradient of ``y``) to layer ``name``'s squared norms when ``y``'s
        gradient arrives while the tracker is active; returns ``y``."""
        if y.requires_grad:
            xd = x.detach()

            def on_grad(g: torch.Tensor) -> None:
                if self._recording():
                    self._add(name, sq(xd, g.detach()))

            y.register_hook(on_grad)
        return y

    def _begin_call(self, name: str, x: torch.Tensor) -> None:
        """Checks one tracked call of module `name` on the batch-first input `x` (new step, reuse, batch size)."""
        if self._backward_started:  # a new step
            self.reset()
        if self._pending.get(name):
            raise ValueError(
                f"GradNormTracker: module '{name}' was called more than once in one forward (weights reused); "
                "per-sample norms of reused parameters are not supported"
            )
        if x.dim() < 2:
            raise ValueError(
                f"GradNormTracker: module '{name}' got an input of shape {tuple(x.shape)}; batch-first "
                "inputs [B, ...] are required"
            )
        b = int(x.shape[0])
        if self._batch is None:
            self._batch = b
        elif self._batch != b:
            raise ValueError(
                f"GradNormTracker: module '{name}' saw batch size {b} but an earlier layer saw {self._batch}; "
                "all tracked layers must see the same batch-first batch"
            )

    def _recording(self) -> bool:
        """Whether a gradient arriving now counts towards the step's norms: the tracker is active and this is the
        step's first backward. A later backward over the same forward (a gradient penalty differentiating the
        gradients of ``backward(create_graph=True)``, a second ``retain_graph`` pass) adds nothing."""
        return self._active and (self._task is None or self._task == _graph_task())

    def _add(self, name: str, sq: torch.Tensor) -> None:
        if self._task is None:
            self._task = _graph_task()
        self._backward_started = True
        self._pending[name] = False
        prev = self._sq.get(name)
        self._sq[name] = sq if prev is None else prev + sq

    # -- an Embedding's weight tied to a Linear's: the cross term of the two uses ----------------------------------
    # Per sample, the tied weight's gradient is E + H, with E = Σ_t onehot(tok_t) g_tᵀ (the embedding's use) and
    # H = Σ_s u_s h_sᵀ (the head's: output gradients u_s, inputs h_s). ‖E + H‖² = ‖E‖² + ‖H‖² + 2⟨E, H⟩, and
    # ⟨E, H⟩ = Σ_t g_t · R_t with R_t = Σ_s u_s[tok_t] h_s. Whichever of the two backward steps comes second forms it.
    def _tie_from_head(self, head: str, h3: torch.Tensor, u3: torch.Tensor) -> None:
        if head not in self._tie_emb_of:
            return
        emb, module = self._tie_emb_of[head]
        tokens = self._tie_tokens.get(emb)
        if tokens is None:
            return
        b = h3.shape[0]
        tok = tokens.reshape(b, -1)
        u = u3.to(h3.dtype)
        ug = torch.gather(u, 2, tok.unsqueeze(1).expand(b, u.shape[1], tok.shape[1]))  # [B, S, T]: u_s[tok_t]
        r = torch.bmm(ug.transpose(1, 2), h3)  # [B, T, d]
        if module.padding_idx is not None:
            r = r.masked_fill((tok == module.padding_idx).unsqueeze(2), 0)
        self._tie_meet(emb, "R", r)

    def _tie_meet(self, emb: str, kind: str, t: torch.Tensor) -> None:
        """Keeps the first of R (from the head) and G (the embedding's output gradients) of this step; with the second,
        records 2⟨E, H⟩ per sample and drops both."""
        other = self._tie_stash.pop(emb, None)
        if other is None or other[0] == kind:
            self._tie_stash[emb] = (kind, t.detach())
            return
        a, c = t.detach(), other[1]
        dtype = torch.promote_types(a.dtype, c.dtype)
        self._cross[emb] = 2.0 * (a.to(dtype) * c.to(dtype)).sum(dim=(1, 2), dtype=torch.float64)

    def _layer_sq(self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.methods[name] = "exact"
        if isinstance(module, nn.Embedding):
            if name in self._tie_head_of:
                self._tie_meet(name, "G", g.reshape(x.shape[0], -1, g.shape[-1]))
            if g.device.type == "cpu" and x.device.type == "cpu" and g.is_floating_point():
                b = x.shape[0]
                idx = x.reshape(b, -1)
                return embedding_grad_sqnorms(idx, g.reshape(b, idx.shape[1], -1), padding_idx=module.padding_idx)
            return _embedding_sq(module, x, g)
        if isinstance(module, nn.LayerNorm):
            return _layer_norm_sq(module, x, g)
        if isinstance(module, nn.GroupNorm):
            return _group_norm_sq(module, x, g)
        return _rms_norm_sq(module, x, g)

    def _linear(self, name: str, a3: torch.Tensor, g3: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
        if g3.dtype != a3.dtype:  # mixed precision: one documented cast to the input's dtype
            g3 = g3.to(a3.dtype)
        self._tie_from_head(name, a3, g3)
        if weight:
            w, bsq, used = linear_grad_sqnorms(a3, g3, method=self.method, bias=bias)
            self.methods[name] = used
            return w + bsq if bias else w
        self.methods[name] = "exact"
        return g3.sum(dim=1, dtype=torch.float64).pow(2).sum(dim=1)

    # -- Linear and Conv: the book-keeping form or an output-gradient hook ---------------------------------------------
    def _form(self, t: int, d_in: int, d_out: int, bookkeeping: bool) -> str:
        if self.method != "auto":
            return self.method
        return gradnorm_method(t, d_in, d_out, bookkeeping=bookkeeping)

    def _linear_apply(
        self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wt: bool, bt: bool
    ) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for a tracked call (the caller has run ``_begin_call``): through
        :class:`_LinearBookkeeping` when the direct form is chosen and can run as book-keeping, else plainly with a hook
        on the output gradient."""
        b = x.shape[0]
        d_in, d_out = weight.shape[1], weight.shape[0]
        t = x.numel() // max(b * d_in, 1)
        bk = wt and _bookkeeping_ok(x, weight)
        if bk and self._form(t, d_in, d_out, True) == "direct":
            return _LinearBookkeeping.apply(x, weight, bias, self, name)
        return self._hook_output(
            name,
            F.linear(x, weight, bias),
            x,
            lambda xd, g: self._linear(name, xd.reshape(b, -1, d_in), g.reshape(b, -1, d_out), wt, bt),
        )

    def _conv_apply(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The forward of a tracked Conv1d/Conv2d call (the caller has run ``_begin_call``), as ``_linear_apply``."""
        weight, bias = module.weight, module.bias
        nd = weight.dim() - 2
        if _trainable(weight) and x.dim() == nd + 2 and _bookkeeping_ok(x, weight):
            rp = module._reversed_padding_repeated_twice  # (left, right) per dimension, last dimension first
            lo, hi = rp[0::2][::-1], rp[1::2][::-1]
            positions, d_in = 1, weight.shape[1]
            for i in range(nd):
                k = weight.shape[2 + i]
                span = x.shape[2 + i] + lo[i] + hi[i] - module.dilation[i] * (k - 1) - 1
                positions *= max(span // module.stride[i] + 1, 0)
                d_in *= k
            if self._form(positions, d_in, weight.shape[0] // module.groups, True) == "direct":
                if module.padding_mode != "zeros" or list(lo) != list(hi):
                    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                    x = F.pad(x, rp, mode=mode)
                    padding = (0,) * nd
                else:
                    padding = tuple(lo)
                geometry = (tuple(module.stride), padding, tuple(module.dilation), module.groups)
                return _ConvBookkeeping.apply(x, weight, bias, geometry, self, name)
        y = type(module).forward(module, x)
        return self._hook_output(name, y, x, lambda xd, g: self._conv(name, module, xd, g))

    def _record(self, name: str, sq: torch.Tensor, method: str = "direct") -> None:
        self.methods[name] = method
        self._add(name, sq)

    def _layer_norm_apply(self, name: str, module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """The forward of a tracked LayerNorm call (the caller has run ``_begin_call``): through
        :class:`_LayerNormTracked` where it can run (CPU float32/float64, no autocast), else the plain forward with a
        hook on the output gradient that recomputes ``x̂``."""
        weight, bias = module.weight, module.bias
        shape = tuple(module.normalized_shape)
        nd = len(shape)
        if (
            weight is not None
            and _bookkeeping_ok(x, weight)
            and (bias is None or bias.dtype == x.dtype)
            and x.dim() > nd
            and tuple(x.shape[x.dim() - nd :]) == shape
        ):
            return _LayerNormTracked.apply(x, weight, bias, shape, module.eps, self, name)
        y = type(module).forward(module, x)
        return self._hook_output(name, y, x, lambda xd, g: self._layer_sq(name, module, xd, g))

    def _conv(self, name: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        weight, bias = _trainable(module.weight), _trainable(module.bias)
        total = None
        for a3, g3 in conv_operands(module, x, g):
            part = self._linear(name, a3, g3, weight, bias)
            total = part if total is None else total + part
        return total


_LINEAR_MAPS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NO_FORWARD = object()
_BOOKKEEPING_DTYPES = (torch.float32, torch.float64)


def _bookkeeping_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the book-keeping form can run: CPU tensors of one float32/float64 dtype, no autocast (under autocast the
    output gradient's dtype differs from the saved input's)."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _BOOKKEEPING_DTYPES
        and not torch.is_autocast_enabled("cpu")
    )


def _embedding_head_tie(
    a: tuple[str, nn.Module, str], b: tuple[str, nn.Module, str]
) -> tuple[tuple[str, nn.Embedding], str] | None:
    """((embedding name, embedding), Linear name) when the two owners ``(module name, module, parameter name)`` of one
    parameter are an Embedding's weight and a Linear's weight, else None."""
    if a[2] != "weight" or b[2] != "weight":
        return None
    for (e_name, e, _), (h_name, h, _) in ((a, b), (b, a)):
        if isinstance(e, nn.Embedding) and type(h) is nn.Linear:
            return (e_name, e), h_name
    return None


def _graph_task() -> int:
    """The id of the autograd graph task running now (-1 outside a backward, or where torch does not say)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if fn is None else int(fn())


def _make_map_forward(tracker: GradNormTracker, name: str):
    """A forward for one Linear/Conv1d/Conv2d, used while the tracker is entered: untracked calls (tracker not
    recording, grad disabled) run the class's forward; tracked ones go through ``_linear_apply`` / ``_conv_apply``."""

    def forward(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (tracker._active and torch.is_grad_enabled()):
            return type(mod).forward(mod, x)
        tracker._begin_call(name, x)
        tracker._pending[name] = True
        if isinstance(mod, nn.Linear):
            return tracker._linear_apply(name, x, mod.weight, mod.bias, _trainable(mod.weight), _trainable(mod.bias))
        return tracker._conv_apply(name, mod, x)

    return forward


class _LinearBookkeeping(torch.autograd.Function):
    """``F.linear`` whose backward computes the weight gradient as the sum of the per-sample gradients it squares for
    the tracker (:func:`poisonguard.ops.linear_grad_bookkeeping`), instead of autograd's own weight-gradient GEMM, and
    the bias gradient from the same pass. The input gradient is torch's."""

    @staticmethod
    def forward(ctx, x, weight, bias, tracker, name):
        ctx.save_for_backward(x, weight)
        ctx.tracker, ctx.name = tracker, name
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        b, d_in, d_out = x.shape[0], weight.shape[1], weight.shape[0]
        gx = g.matmul(weight) if need_x else None
        a3, g3 = x.reshape(b, -1, d_in), g.reshape(b, -1, d_out)
        tracker = ctx.tracker
        gw = gb = None
        recording = tracker._recording()
        if recording:
            tracker._tie_from_head(ctx.name, a3.detach(), g3.detach())
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients autograd can differentiate again
            if recording:
                with torch.no_grad():
                    wsq, bsq, *_ = linear_grad_bookkeeping(a3.detach(), g3.detach(), bias=need_b)
                tracker._record(ctx.name, wsq + bsq if need_b else wsq)
            if need_w:
                gw = g3.reshape(-1, d_out).t().mm(a3.reshape(-1, d_in))
            if need_b:
                gb = g3.sum(dim=(0, 1))
        elif recording:  # the kernel also sums the bias gradient (from the per-sample sums it squares)
            if need_b:
                wsq, bsq, gw, gb = linear_grad_bookkeeping(a3, g3, bias=True, bias_grad=True)
                tracker._record(ctx.name, wsq + bsq)
            else:
                wsq, _, gw = linear_grad_bookkeeping(a3, g3)
                tracker._record(ctx.name, wsq)
        else:  # a backward outside the tracker's block: the plain gradients
            if need_w:
                gw = g3.reshape(-1, d_out).t().mm(a3.reshape(-1, d_in))
            if need_b:
                gb = g3.sum(dim=(0, 1))
        return gx, (gw.to(weight.dtype) if need_w else None), gb, None, None


class _ConvBookkeeping(torch.autograd.Function):
    """``F.conv1d`` / ``F.conv2d`` (zero padding) with the weight gradient from
    :func:`poisonguard.ops.conv_grad_bookkeeping`; the input gradient is torch's (``convolution_backward`` asked for
    the input only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, tracker, name):
        stride, padding, dilation, groups = geometry
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.tracker, ctx.name = geometry, tracker, name
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        tracker = ctx.tracker
        record = tracker._recording() and need_w
        # backward(create_graph=True): torch's gradients, which autograd can differentiate again; the kernel only norms
        graph = torch.is_grad_enabled()
        mask = (need_x, need_w and (graph or not record), False)
        gx = gw = gb = None
        if mask[0] or mask[1]:
            zeros = [0] * len(stride)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g, x, weight, None, stride, padding, dilation, False, zeros, groups, mask
            )
        if record:  # the kernel also sums the bias gradient
            with torch.no_grad():
                wsq, bsq, gwk, *gbk = conv_grad_bookkeeping(
                    x.detach(),
                    g.detach(),
                    kernel_size=tuple(weight.shape[2:]),
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=groups,
                    bias=need_b,
                    bias_grad=need_b and not graph,
                )
            tracker._record(ctx.name, wsq + bsq if need_b else wsq)
            if not graph:
                gw = gwk.to(weight.dtype)
                gb = gbk[0] if need_b else None
        if need_b and (graph or not record):
            gb = g.sum(dim=[0, *range(2, g.dim())])
        return gx, gw, gb, None, None, None


def _make_layer_norm_forward(tracker: GradNormTracker, name: str):
    """A forward for one LayerNorm, used while the tracker is entered (untracked calls run the class's forward)."""

    def forward(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if not (tracker._active and torch.is_grad_enabled()):
            return type(mod).forward(mod, x)
        tracker._begin_call(name, x)
        tracker._pending[name] = True
        return tracker._layer_norm_apply(name, mod, x)

    return forward


class _LayerNormTracked(torch.autograd.Function):
    """``torch.native_layer_norm`` (what ``F.layer_norm`` runs on CPU) keeping the mean and 1/std it returns; the
    backward takes the input gradient from torch's ``native_layer_norm_backward`` and computes the per-sample affine
    gradients ``Σ_t g_t ⊙ x̂_t``, ``Σ_t g_t`` (``x̂`` from the saved statistics, not a second normalisation), their
    squared norms for the tracker and their sums as the weight and bias gradients
    (:func:`poisonguard.ops.layer_norm_grad_sqnorms`) in one pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, tracker, name):
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape, ctx.tracker, ctx.name = shape, tracker, name
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        tracker = ctx.tracker
        record = tracker._recording() and (need_w or need_b)
        # backward(create_graph=True): torch's gradients, which autograd can differentiate again; the kernel only norms
        graph = torch.is_grad_enabled()
        mask = [need_x, need_w and (graph or not record), need_b and (graph or not record)]
        gx = gw = gb = None
        if any(mask):
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                g, x, list(ctx.shape), mean, rstd, weight, bias, mask
            )
        if record:
            b, n = x.shape[0], weight.numel()
            with torch.no_grad():
                wsq, bsq, gwk, gbk = layer_norm_grad_sqnorms(
                    x.detach().reshape(b, -1, n),
                    g.detach().reshape(b, -1, n),
                    mean.detach(),
                    rstd.detach(),
                    weight=need_w,
                    bias=need_b,
                )
            sq = wsq if bsq is None else (bsq if wsq is None else wsq + bsq)
            tracker._record(ctx.name, sq, "exact")
            if not graph:
                gw = None if gwk is None else gwk.reshape(weight.shape)
                gb = None if gbk is None else gbk.reshape(bias.shape)
        return gx, gw, gb, None, None, None, None


def _make_attention_forward(tracker: GradNormTracker, name: str):
    """A forward for one nn.MultiheadAttention, used while the tracker is entered: the same computation as
    F.multi_head_attention_forward, with the q, k and v input projections as three F.linear calls whose output
    gradients are hooked (their per-sample norms add up to the one of in_proj_weight/in_proj_bias, whose row blocks
    they are) and out_proj called as a module (tracked as a Linear)."""

    def forward(
        mod: nn.MultiheadAttention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if query.dim() != 3:
            raise ValueError(f"GradNormTracker: module '{name}' needs batched [.., .., E] inputs, got {query.shape}")
        if not mod.batch_first:
            query, key, value = (z.transpose(0, 1) for z in (query, key, value))
        b, tq, e = query.shape
        ts = key.shape[1]
        h = mod.num_heads
        hd = e // h
        track = tracker._active and torch.is_grad_enabled()
        if track:
            tracker._begin_call(name, query)
            tracker._pending[name] = True
        if mod._qkv_same_embed_dim:
            wq, wk, wv = mod.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
        wtrain = [_trainable(w) for w in ((mod.in_proj_weight,) * 3 if mod._qkv_same_embed_dim else (wq, wk, wv))]
        bq = bk = bv = None
        if mod.in_proj_bias is not None:
            bq, bk, bv = mod.in_proj_bias.chunk(3)
        btrain = _trainable(mod.in_proj_bias)
        projected = []
        for x, w, bias, wt in zip((query, key, value), (wq, wk, wv), (bq, bk, bv), wtrain):
            if track and (wt or btrain):
                projected.append(tracker._linear_apply(name, x, w, bias, wt, btrain))
            else:
                projected.append(F.linear(x, w, bias))
        q, k, v = projected
        q = q.reshape(b, tq, h, hd).transpose(1, 2)
        k = k.reshape(b, ts, h, hd).transpose(1, 2)
        v = v.reshape(b, ts, h, hd).transpose(1, 2)
        scores = (q * hd**-0.5) @ k.transpose(-2, -1)  # [B, H, Tq, Ts]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tq, ts, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, h, tq, ts)
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
        if key_padding_mask is not None:
            m = key_padding_mask.reshape(b, 1, 1, ts)
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
        weights = torch.softmax(scores, dim=-1)
        if mod.dropout > 0.0 and mod.training:
            weights = F.dropout(weights, p=mod.dropout)
        out = mod.out_proj((weights @ v).transpose(1, 2).reshape(b, tq, e))
        if not mod.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights

    return forward


def _unfold(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """``F.unfold(x, kernel, dilation, padding=0, stride)`` ``[B, C·kh·kw, L]`` as one copy of a strided window view
    of ``x`` (torch's CPU im2col was ~7x slower here)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = x.stride()
    windows = x.as_strided((b, c, kh, kw, ho, wo), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3), x.storage_offset())
    return windows.reshape(b, c * kh * kw, ho * wo)


def conv_operands(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The linear-map operands ``(a [B, L, C_in/groups·k], g [B, L, C_out/groups])`` of a Conv1d/Conv2d, one pair per
    group of channels: the input unfolded (as ``F.unfold``, after the module's padding and padding mode) and the output
    gradient, both as strided views of ``[B, ·, L]`` tensors (the unfolded input is the one new tensor)."""
    b = x.shape[0]
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    cols = _unfold(x, kernel, stride, dilation)  # [B, C_in·k, L]
    a3 = cols.transpose(1, 2)  # [B, L, C_in·k]
    g3 = g.reshape(b, g.shape[1], -1).transpose(1, 2)  # [B, L, C_out]
    if a3.shape[1] != g3.shape[1]:
        raise ValueError(
            f"GradNormTracker: unfolded input has {a3.shape[1]} positions but the output gradient has {g3.shape[1]}"
        )
    groups = module.groups
    if groups == 1:
        return [(a3, g3)]
    din, dout = a3.shape[2] // groups, g3.shape[2] // groups
    return [(a3[:, :, k * din : (k + 1) * din], g3[:, :, k * dout : (k + 1) * dout]) for k in range(groups)]


def _embedding_sq(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per sample, the gradient rows of every distinct token id (the sum of that id's output gradients), squared."""
    b = idx.shape[0]
    idx = idx.reshape(b, -1)
    g2 = g.reshape(b * idx.shape[1], -1)
    vocab = module.num_embeddings
    sample = torch.arange(b, device=idx.device).repeat_interleave(idx.shape[1])
    flat = idx.reshape(-1)
    if module.padding_idx is not None:
        keep = flat != module.padding_idx
        flat, sample, g2 = flat[keep], sample[keep], g2[keep]
    uniq, inverse = torch.unique(sample * vocab + flat, return_inverse=True)
    rows = torch.zeros(uniq.shape[0], g2.shape[1], dtype=g2.dtype, device=g2.device).index_add_(0, inverse, g2)
    out = torch.zeros(b, dtype=torch.float64, device=g2.device)
    return out.index_add_(0, torch.div(uniq, vocab, rounding_mode="floor"), _row_sq(rows))


def _row_sq(m: torch.Tensor) -> torch.Tensor:
    """Σ_j m[i, j]² per row of a 2-D tensor, float64."""
    return torch.linalg.vector_norm(m, dim=1).double().pow(2)


def _affine_sq(xhat: torch.Tensor, g: torch.Tensor, weight: bool, bias: bool) -> torch.Tensor:
    """``xhat`` and ``g`` as ``[B, P, N]``: per-sample Σ_p g·x̂ (weight) and Σ_p g (bias), squared and summed (the sums
    over positions in the input's dtype, as autograd's own reduction)."""
    out = torch.zeros(xhat.shape[0], dtype=torch.float64, device=xhat.device)
    if weight:
        out += _row_sq((g * xhat).sum(dim=1))  # (einsum would copy both operands into a batched matmul)
    if bias:
        out += _row_sq(g.sum(dim=1))
    return out


def _normalized_rows(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``x`` and ``g`` as ``[B, P, N]`` over the module's ``normalized_shape`` (N = its size), and N."""
    b, n = x.shape[0], 1
    for s in module.normalized_shape:
        n *= s
    return x.reshape(b, -1, n), g.reshape(b, -1, n), n


def _layer_norm_sq(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x3, g3, n = _normalized_rows(module, x, g)
    xhat = torch.native_layer_norm(x3, (n,), None, None, module.eps)[0]  # (x − μ)·rstd, as the forward computed it
    return _affine_sq(xhat, g3.to(xhat.dtype), _trainable(module.weight), _trainable(module.bias))


def _group_norm_sq(module: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[0], x.shape[1]
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps).reshape(b, c, -1).transpose(1, 2)  # [B, P, C]
    g3 = g.reshape(b, c, -1).transpose(1, 2).to(xhat.dtype)
    return _affine_sq(xhat, g3, _trainable(module.weight), _trainable(module.bias))


def _rms_norm_sq(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x3, g3, n = _normalized_rows(module, x, g)
    xhat = F.rms_norm(x3, (n,), None, module.eps)  # x / sqrt(mean(x²) + eps), as the forward computed it
    return _affine_sq(xhat, g3.to(xhat.dtype), _trainable(module.weight), False)


__all__ = ["GradNormTracker"]
