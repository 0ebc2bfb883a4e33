"""Trimmed cross-entropy (fused C++ kernel, ops and torch API) against the float64 reference."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import poisonguard
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from poisonguard._reference import _trimmed_cross_entropy
from poisonguard.ops.trim import keep_count, trimmed_cross_entropy_backward, trimmed_cross_entropy_forward

torch = pytest.importorskip("torch")
F = torch.nn.functional
from poisonguard.torch import TrimmedCrossEntropyLoss, trimmed_cross_entropy, trimmed_loss  # noqa: E402

# Relative Frobenius error of values and gradients against float64 on the same (rounded) inputs.
TOL = {"float64": 1e-12, "float32": 2e-6}
DT = {"float32": torch.float32, "float64": torch.float64}


def rel(got, want, floor: float = 0.0) -> float:
    """Relative Frobenius error; ``floor`` bounds the denominator from below (absolute error for tiny values)."""
    got = np.asarray(got.detach().double() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    ref = max(float(np.linalg.norm(want)), floor)
    err = float(np.linalg.norm(got - want))
    return err / ref if ref > 0 else err


def run(x, t, trim, reduction="mean", ignore_index=-100, grad_out=None):
    """(value, grad, keep) of the torch API on a leaf copy of x, backward with grad_out (ones by default)."""
    x = x.detach().requires_grad_(True)
    v, keep = trimmed_cross_entropy(x, t, trim, reduction=reduction, ignore_index=ignore_index, return_kept=True)
    v.backward(torch.ones_like(v) if grad_out is None else grad_out)
    return v.detach(), x.grad, keep


def check(x, t, trim, dtype, reduction="mean", ignore_index=-100):
    v, g, keep = run(x, t, trim, reduction, ignore_index)
    rv, rg, rk = _trimmed_cross_entropy(x, t, trim, ignore_index, reduction)
    assert v.dtype == x.dtype and g.dtype == x.dtype and g.shape == x.shape
    # Losses near 0 lose relative precision to log(1 + tiny) in any formulation: absolute error below 1.
    assert rel(v, rv, floor=1.0) <= TOL[dtype], (rel(v, rv, floor=1.0), reduction)
    # Same for softmax − 1 near 0: errors are measured against the scale of a kept row's gradient (1/k).
    floor = 1.0 / max(int(rk.sum()), 1)
    assert rel(g, rg, floor) <= TOL[dtype] * 4, rel(g, rg, floor)
    np.testing.assert_array_equal(keep.numpy(), rk)
    return v, g, keep


# -- values and gradients against the reference -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("b", "c"), [(1, 1), (1, 5), (7, 1), (50, 7), (333, 100), (64, 1200), (2000, 3)])
@pytest.mark.parametrize("trim", [0.0, 0.37])
def test_matches_reference(dtype, b, c, trim):
    g = torch.Generator().manual_seed(b * 1000 + c)
    x = (torch.randn(b, c, generator=g, dtype=torch.float64) * 3).to(DT[dtype])
    t = torch.randint(0, c, (b,), generator=g)
    for reduction in ("mean", "sum", "none"):
        check(x, t, trim, dtype, reduction)


@pytest.mark.parametrize(("b", "trim", "k"), [(50, 0.01, 50), (50, 0.99, 1), (10, 0.3, 7), (3, 0.5, 2), (1, 0.9, 1)])
def test_keep_count_edges(b, trim, k):
    assert keep_count(b, trim) == k == max(min(b, math.ceil(round((1 - trim) * b, 9))), 1)
    x = torch.randn(b, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
    t = torch.arange(b) % 4
    _, _, keep = check(x, t, trim, "float64")
    assert int(keep.sum()) == k


def test_keep_count_empty():
    assert keep_count(0, 0.5) == 0
    assert keep_count(1, 0.0) == 1


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(0, 40),
    c=st.integers(1, 17),
    trim=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**31 - 1),
    ignore_share=st.sampled_from([0.0, 0.3]),
)
def test_fuzz_shapes(b, c, trim, seed, ignore_share):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((b, c)) * 4)
    t = torch.from_numpy(np.where(rng.random(b) < ignore_share, -100, rng.integers(0, c, b)))
    for reduction in ("mean", "sum", "none"):
        check(x, t, trim, "float64", reduction)


def test_matches_torch_topk_reference():
    # The eager formulation the kernel replaces: F.cross_entropy(reduction="none") + topk + mean (no ties here).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    t = torch.randint(0, 20, (300,), generator=g)
    xr = x.clone().requires_grad_(True)
    k = keep_count(300, 0.2)
    ref = torch.topk(F.cross_entropy(xr, t, reduction="none"), k, largest=False).values.mean()
    ref.backward()
    v, grad, _ = run(x, t, 0.2)
    torch.testing.assert_close(v, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_trim_zero_is_plain_cross_entropy(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, 3, generator=g).to(DT[dtype])
    t = torch.randint(0, 6, (40, 3), generator=g)
    t[::5, 1] = -100
    for reduction in ("mean", "sum", "none"):
        xr = x.clone().requires_grad_(True)
        ref = F.cross_entropy(xr, t, reduction=reduction)
        ref.backward(torch.ones_like(ref))
        v, grad, _ = run(x, t, 0.0, reduction)
        tol = 1e-12 if dtype == "float64" else 2e-6
        torch.testing.assert_close(v, ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(grad, xr.grad, rtol=tol, atol=tol)


# -- layouts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "offset_cols"])
def test_non_contiguous_logits(dtype, layout):
    g = torch.Generator().manual_seed(5)
    b, c = 120, 37
    if layout == "transposed":
        x = torch.randn(c, b, generator=g).to(DT[dtype]).T
    elif layout == "sliced":
        x = torch.randn(2 * b, 3 * c, generator=g).to(DT[dtype])[::2, 1::3]
    else:
        x = torch.randn(b, c + 5, generator=g).to(DT[dtype])[:, 5:]
    assert not x.is_contiguous()
    t = torch.randint(0, c, (b,), generator=g)
    for reduction in ("mean", "none"):
        check(x, t, 0.25, dtype, reduction)
    _, x3, _, _ = trimmed_cross_entropy_forward(x, t, 0.25)
    assert x3.data_ptr() == x.data_ptr() and x3.stride()[:2] == x.stride()  # read in place, no copy


@pytest.mark.parametrize(
    "shape_perm", [((9, 5, 4), None), ((6, 4, 3, 5), None), ((6, 4, 3, 5), "channels_last"), ((6, 4, 6, 5), "sliced")]
)
def test_spatial_logits(shape_perm):
    shape, layout = shape_perm
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # trailing dims that cannot merge into one stride: the one documented copy
        x = x[:, :, ::2, :]
    t = torch.randint(0, shape[1], (shape[0], *x.shape[2:]), generator=g)
    t[0, 0] = -100
    for reduction in ("mean", "sum", "none"):
        v, _, keep = check(x, t, 0.2, "float64", reduction)
        assert keep.shape == t.shape
        if reduction == "none":
            assert v.shape == t.shape


def test_numpy_ops_level_and_negative_strides():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((80, 12)).astype(np.float32)[::-1]  # negative row stride
    t = rng.integers(0, 12, 80)
    state, x3, tf, row_shape = trimmed_cross_entropy_forward(x, t, 0.15)
    assert row_shape == (80,) and state.k == keep_count(80, 0.15) and np.shares_memory(x3, x)
    rv, rg, rk = _trimmed_cross_entropy(x, t, 0.15)
    assert abs(state.total / state.k - rv) <= 2e-6 * abs(rv)
    np.testing.assert_array_equal(state.keep, rk)
    grad = trimmed_cross_entropy_backward(x3, tf, state, np.ones(1), 1.0 / state.k)[:, :, 0]
    assert grad.dtype == np.float32 and rel(grad, rg) <= 1e-5


# -- semantics -------------------------------------------------------------------------------------------------------
def test_ties_keep_lower_index():
    # Identical rows: every loss is equal, so the first k valid rows are kept.
    x = torch.zeros(10, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, -100, 0, 1, 2, 3, 0])
    _, _, keep = run(x, t, 0.5)
    assert keep.tolist() == [True, True, True, True, False, True, False, False, False, False]
    # Ties among other values: the stable order of the reference.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0, 1, 0, 0, 1])
    _, _, keep = run(x, t, 0.4)
    assert keep.tolist() == [True, True, False, True, False]  # row 3 is smallest, then the tied rows 0, 1, 2


def test_ignore_index_excluded_before_trimming():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (30,), generator=g)
    t[::3] = 2  # a class id used as ignore_index, as torch allows
    _, grad, keep = check(x, t, 0.2, "float64", ignore_index=2)
    n_valid = int((t != 2).sum())
    assert int(keep.sum()) == keep_count(n_valid, 0.2)
    assert not keep[t == 2].any() and (grad[t == 2] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty(reduction):
    for x, t in (
        (torch.randn(6, 3, dtype=torch.float64), torch.full((6,), -100)),
        (torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)),
    ):
        v, grad, keep = run(x, t, 0.1, reduction)
        assert (v == 0).all() and (grad == 0).all() and grad.shape == x.shape and not keep.any()


def test_extreme_logits():
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [3.0, 1.0, -2.0], [-1e4, -1e4, -1e4]], dtype=torch.float64)
    t = torch.tensor([1, 2, 0, 2])
    check(x, t, 0.25, "float64")
    check(x.float(), t, 0.25, "float32")
    check(x, t, 0.0, "float64", "none")


def test_minus_inf_logits_and_infinite_loss():
    x = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.0, -math.inf], [0.5, 0.2, 0.1]], dtype=torch.float64)
    t = torch.tensor([0, 2, 1])  # row 1 targets a -inf logit: infinite loss, dropped first
    v, grad, keep = run(x, t, 0.34)
    assert keep.tolist() == [True, False, True] and math.isfinite(float(v))
    rv, rg, _ = _trimmed_cross_entropy(x, t, 0.34)
    assert abs(float(v) - rv) <= 1e-12 and rel(grad, rg) <= 1e-12
    v, _, _ = run(x, t, 0.0)
    assert math.isinf(float(v))  # kept: the mean is +inf, as with F.cross_entropy


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_logits_raise(bad):
    x = torch.randn(5, 4, dtype=torch.float32)
    x[3, 1] = bad
    t = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="row 3 holds NaN or \\+inf"):
        trimmed_cross_entropy(x, t, 0.2)
    t[3] = -100  # an ignored row is not read
    trimmed_cross_entropy(x, t, 0.2)
    x = torch.full((2, 3), -math.inf)
    with pytest.raises(ValueError, match="no finite value"):
        trimmed_cross_entropy(x, torch.tensor([0, 1]))


def test_grad_output_not_one():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(25, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 6, (25,), generator=g)
    _, rg, _ = _trimmed_cross_entropy(x, t, 0.2)
    _, grad, _ = run(x, t, 0.2, grad_out=torch.tensor(-3.5, dtype=torch.float64))
    assert rel(grad, -3.5 * rg) <= 1e-12
    w = torch.randn(25, generator=g, dtype=torch.float64)
    _, grad, _ = run(x, t, 0.2, "none", grad_out=w)
    _, rg_sum, _ = _trimmed_cross_entropy(x, t, 0.2, reduction="sum")
    assert rel(grad, rg_sum * w.numpy()[:, None]) <= 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(12, 5), (5, 4, 3)])
def test_gradcheck(reduction, shape):
    g = torch.Generator().manual_seed(10)
    base = torch.randn(shape[0], shape[1] * 2, *shape[2:], generator=g, dtype=torch.float64)
    x = base[:, ::2].clone() if len(shape) > 2 else base[:, ::2]  # strided leaf in the 2-D case
    x = x.detach().requires_grad_(True)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[1] = -100
    assert torch.autograd.gradcheck(lambda a: trimmed_cross_entropy(a, t, 0.3, reduction=reduction), (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(12, 5), (6, 4, 3)])
def test_second_derivatives(reduction, shape):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[2] = -100
    fn = lambda a: trimmed_cross_entropy(a, t, 0.25, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))
    # the create_graph gradient equals the fused kernel's, and a gradient penalty differentiates through it
    (g1,) = torch.autograd.grad(fn(x).sum(), x)
    (g2,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    torch.testing.assert_close(g2.detach(), g1, rtol=1e-12, atol=1e-14)
    (pen,) = torch.autograd.grad(g2.pow(2).sum(), x)
    rows = x.unsqueeze(2) if x.dim() == 2 else x
    loss = F.cross_entropy(rows, t.view(shape[0], -1), reduction="none", ignore_index=-100)
    _, keep = trimmed_cross_entropy(x.detach(), t, 0.25, reduction="none", return_kept=True)
    w = keep.view(shape[0], -1).double()
    if reduction == "mean":
        w = w / w.sum()
    (gr,) = torch.autograd.grad((loss * w).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad(gr.pow(2).sum(), x)
    torch.testing.assert_close(pen, want, rtol=1e-10, atol=1e-12)
    assert float(pen.abs().max()) > 0


@pytest.mark.parametrize("shape", [(200, 37), (64, 1100), (30, 6, 4), (50, 17), (40, 16)])
@pytest.mark.parametrize(("reduction", "gout"), [("mean", None), ("mean", -3.5), ("sum", None), ("none", "rand")])
def test_eager_gradient_matches_default(monkeypatch, shape, reduction, gout):
    # EAGER_GRADIENT (on by default): the forward pass writes the gradient (float32, unit class stride, C > 16).
    import poisonguard.torch.trim as trim_mod

    g = torch.Generator().manual_seed(16)
    x = torch.randn(*shape, generator=g) * 3
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::9] = -100
    if gout == "rand":
        gout = torch.rand(t.shape, generator=g)
    elif gout is not None:
        gout = torch.tensor(gout)
    assert trim_mod.EAGER_GRADIENT
    v1, g1, k1 = run(x, t, 0.3, reduction, grad_out=gout)
    monkeypatch.setattr(trim_mod, "EAGER_GRADIENT", False)
    v0, g0, k0 = run(x, t, 0.3, reduction, grad_out=gout)
    assert torch.equal(v0, v1) and torch.equal(k0, k1)
    assert rel(g1, g0.numpy()) <= 1e-6
    assert (g1.movedim(1, -1)[~k1] == 0).all()  # dropped and ignored rows
    check(x, t, 0.3, "float32", reduction)
    # [B, C, d]: class stride d; C <= 16: 8-row kernel; the eager kernel is AVX2 code (not in a generic x86-64 build)
    eager_kernel = len(shape) == 2 and shape[1] > 16 and poisonguard.build_info()["cpu_isa"] == "avx2"
    state, *_ = trimmed_cross_entropy_forward(x, t, 0.3, eager_grad=True)
    assert (state.grad is not None) == eager_kernel
    monkeypatch.setattr(trim_mod, "EAGER_GRADIENT", True)
    with torch.no_grad():  # no gradient needed: the default forward runs
        assert torch.equal(trimmed_cross_entropy(x, t, 0.3, reduction=reduction), v0)


def test_eager_gradient_backward_twice_and_mask_only():
    # retain_graph: the eager buffer is handed out once, the second backward computes the gradient again.
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(70, 40, generator=g) * 2).requires_grad_(True)
    t = torch.randint(0, 40, (70,), generator=g)
    loss = trimmed_cross_entropy(x, t, 0.2)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    assert rel(x.grad, 2 * once.numpy()) <= 1e-6
    x.grad = None
    out, keep = trimmed_cross_entropy(x, t, 0.2, return_kept=True)
    assert not keep.requires_grad and out.requires_grad
    (out * 0.5).backward()
    assert rel(x.grad, 0.5 * once.numpy()) <= 1e-6


def test_deterministic_and_thread_independent():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3000, 50, generator=g)
    t = torch.randint(0, 50, (3000,), generator=g)
    v1, g1, _ = run(x, t, 0.1)
    n = poisonguard.get_num_threads()
    try:
        poisonguard.set_num_threads(1)
        v2, g2, _ = run(x, t, 0.1)
    finally:
        poisonguard.set_num_threads(n)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


def test_module_matches_function():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(40, 7, generator=g)
    t = torch.randint(0, 7, (40,), generator=g)
    crit = TrimmedCrossEntropyLoss(trim=0.2, reduction="sum")
    assert "trim=0.2" in repr(crit)
    a = crit(x, t)
    b, keep = trimmed_cross_entropy(x, t, 0.2, reduction="sum", return_kept=True)
    assert torch.equal(a, b) and torch.equal(crit.kept_, keep)
    assert torch.equal(TrimmedCrossEntropyLoss(0.0)(x, t), trimmed_cross_entropy(x, t, 0.0))
    w = torch.rand(7, generator=g) + 0.5
    crit = TrimmedCrossEntropyLoss(trim=0.2, weight=w, label_smoothing=0.1)
    assert "label_smoothing=0.1" in repr(crit) and torch.equal(crit.weight, w)
    want = trimmed_cross_entropy(x, t, 0.2, weight=w, label_smoothing=0.1)
    assert torch.equal(crit(x, t), want)
    with pytest.raises(TypeError, match="1-D torch tensor"):
        TrimmedCrossEntropyLoss(weight=[1.0] * 7)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        TrimmedCrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        TrimmedCrossEntropyLoss(label_smoothing="0.1")


def _weighted_reference(x, t, trim, weight, smoothing, ignore_index=-100):
    """float64 numpy reference: per-row smoothed, weighted losses; the k smallest valid rows by a stable argsort."""
    b, c = x.shape[0], x.shape[1]
    xr = np.moveaxis(x.detach().double().numpy().reshape(b, c, -1), 1, 2).reshape(-1, c)  # rows [n, C]
    tr = t.numpy().reshape(-1)
    w = np.ones(c) if weight is None else weight.double().numpy()
    m = xr.max(1, keepdims=True)
    logp = xr - m - np.log(np.exp(xr - m).sum(1, keepdims=True))
    valid = tr != ignore_index
    ts = np.where(valid, tr, 0)
    nll = -logp[np.arange(len(tr)), ts] * w[ts]
    smooth = -(logp * w[None, :]).sum(1)
    loss = np.where(valid, (1 - smoothing) * nll + smoothing / c * smooth, 0.0)
    k = keep_count(int(valid.sum()), trim)
    idx = np.flatnonzero(valid)
    kept = idx[np.argsort(loss[idx], kind="stable")[:k]]
    keep = np.zeros(len(tr), dtype=bool)
    keep[kept] = True
    return loss, keep, loss[keep].sum(), w[ts][keep].sum()


@pytest.mark.parametrize("shape", [(60, 7), (12, 5, 4)])
@pytest.mark.parametrize(("weighted", "smoothing"), [(True, 0.0), (False, 0.2), (True, 0.3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_and_label_smoothing(shape, weighted, smoothing, reduction):
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::7] = -100
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.2 if weighted else None
    # trim=0 is torch's cross-entropy with the same arguments, value and gradient
    got = trimmed_cross_entropy(x, t, 0.0, reduction=reduction, weight=w, label_smoothing=smoothing)
    want = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(got.sum(), x)
    (gb,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    # trim > 0: the numpy reference's kept rows, losses and weighted mean
    out, keep = trimmed_cross_entropy(
        x, t, 0.3, reduction=reduction, weight=w, label_smoothing=smoothing, return_kept=True
    )
    loss, want_keep, total, wsum = _weighted_reference(x, t, 0.3, w, smoothing)
    np.testing.assert_array_equal(keep.numpy().reshape(-1), want_keep)
    if reduction == "none":
        np.testing.assert_allclose(out.detach().numpy().reshape(-1), np.where(want_keep, loss, 0.0), rtol=1e-12)
    else:
        want_v = total if reduction == "sum" else total / (wsum if weighted else want_keep.sum())
        np.testing.assert_allclose(float(out.detach()), want_v, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a: trimmed_cross_entropy(a, t, 0.3, reduction=reduction, weight=w, label_smoothing=smoothing), (x,)
    )


@pytest.mark.parametrize("shape", [(300, 37), (40, 1100), (30, 12, 5), (257, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_fused_matches_torch_path(monkeypatch, shape, reduction):
    # on the CPU (float32/float64) label smoothing runs the fused kernel plus one correction pass; the torch-operator
    # path (class weights, CUDA) is the reference here
    import poisonguard.torch.trim as trim_mod

    g = torch.Generator().manual_seed(23)
    x = torch.randn(*shape, generator=g) * 3
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::11] = -100
    x.view(-1)[5] = -math.inf  # a masked class
    gout = torch.rand(t.shape, generator=g) if reduction == "none" else torch.tensor(1.7)
    xd = x.double().requires_grad_(True)
    want_v, want_k = trim_mod._trimmed_cross_entropy_torch(xd, t, 0.2, reduction, -100, None, 0.15)
    (want_g,) = torch.autograd.grad(want_v, xd, gout.double())
    want_v = want_v.detach()

    def no_torch_path(*a, **k):
        raise AssertionError("the torch-operator path ran")

    monkeypatch.setattr(trim_mod, "_trimmed_cross_entropy_torch", no_torch_path)
    xs = x.clone().requires_grad_(True)
    got_v, got_k = trimmed_cross_entropy(xs, t, 0.2, reduction=reduction, label_smoothing=0.15, return_kept=True)
    assert torch.equal(got_k, want_k)
    torch.testing.assert_close(got_v.double(), want_v, rtol=2e-6, atol=1e-6)
    (got_g,) = torch.autograd.grad(got_v, xs, gout)
    torch.testing.assert_close(got_g.double(), want_g, rtol=1e-5, atol=1e-6)
    assert (got_g.view(shape[0], shape[1], -1).transpose(1, 2).reshape(-1, shape[1])[~got_k.view(-1)] == 0).all()


def test_label_smoothing_ties_keep_lower_rows():
    x = torch.tensor([[1.0, 2.0, 0.5]]).repeat(10, 1)
    x[3] = torch.tensor([5.0, 0.0, 0.0])  # the one low loss (target 0)
    t = torch.zeros(10, dtype=torch.int64)
    t[1] = -100
    _, keep = trimmed_cross_entropy(x, t, 0.5, label_smoothing=0.1, return_kept=True)
    assert keep.tolist() == [True, False, True, True, True, True, False, False, False, False]


def test_label_smoothing_second_derivatives():
    g = torch.Generator().manual_seed(24)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randint(0, 6, (10,), generator=g)
    assert torch.autograd.gradgradcheck(lambda a: trimmed_cross_entropy(a, t, 0.3, label_smoothing=0.2), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    # no fused CPU kernel for these: torch operators, the same rows kept as in float32 (up to rounding ties)
    g = torch.Generator().manual_seed(22)
    x32 = torch.randn(64, 9, generator=g) * 3
    t = torch.randint(0, 9, (64,), generator=g)
    x = x32.to(dtype).requires_grad_(True)
    got = trimmed_cross_entropy(x, t, 0.0)
    torch.testing.assert_close(got, F.cross_entropy(x, t))
    out, keep = trimmed_cross_entropy(x, t, 0.25, return_kept=True)
    assert out.dtype == dtype and int(keep.sum()) == keep_count(64, 0.25)
    _, keep32 = trimmed_cross_entropy(x.detach().float(), t, 0.25, return_kept=True)
    assert int((keep != keep32).sum()) <= 2
    out.backward()
    assert x.grad.dtype == dtype and (x.grad[~keep] == 0).all() and (x.grad[keep] != 0).any()


def test_weight_errors_and_empty():
    x = torch.randn(8, 3)
    t = torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        trimmed_cross_entropy(x, t, weight=torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        trimmed_cross_entropy(x, t, weight=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target must be in \[0, 3\)"):
        trimmed_cross_entropy(x, torch.full((8,), 5), label_smoothing=0.1)
    with pytest.raises(ValueError, match="target must have shape"):
        trimmed_cross_entropy(x, t[:4], label_smoothing=0.1)
    xe = torch.randn(0, 3, requires_grad=True)
    v = trimmed_cross_entropy(xe, torch.zeros(0, dtype=torch.int64), weight=torch.ones(3))
    assert float(v.detach()) == 0.0
    v.backward()
    assert xe.grad.shape == (0, 3)
    ignored = torch.full((8,), -100)
    assert float(trimmed_cross_entropy(x, ignored, label_smoothing=0.1)) == 0.0


def test_trimmed_loss_any_criterion():
    g = torch.Generator().manual_seed(13)
    pred = torch.randn(30, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    per = F.mse_loss(pred, y, reduction="none").sum(1)
    v, keep = trimmed_loss(per, 0.2, return_kept=True)
    k = keep_count(30, 0.2)
    order = np.argsort(per.detach().numpy(), kind="stable")[:k]
    want = np.zeros(30, dtype=bool)
    want[order] = True
    np.testing.assert_array_equal(keep.numpy(), want)
    torch.testing.assert_close(v, per[torch.from_numpy(want)].mean())
    v.backward()
    assert (pred.grad[~keep] == 0).all() and (pred.grad[keep] != 0).any()
    # Ties keep the lower index; sum / none / empty.
    flat = torch.tensor([1.0, 1.0, 1.0, 0.5])
    assert trimmed_loss(flat, 0.5, return_kept=True)[1].tolist() == [True, False, False, True]
    assert float(trimmed_loss(flat, 0.5, reduction="sum")) == 1.5
    assert trimmed_loss(flat, 0.5, reduction="none").tolist() == [1.0, 0.0, 0.0, 0.5]
    assert float(trimmed_loss(torch.zeros(0), 0.5)) == 0.0
    # The fused kernel's per-row losses through trimmed_loss give the same trimmed mean.
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 6, (50,), generator=g)
    torch.testing.assert_close(
        trimmed_loss(F.cross_entropy(x, t, reduction="none"), 0.3), trimmed_cross_entropy(x, t, 0.3)
    )


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_input():
    x = torch.randn(6, 4)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    for trim in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="trim must be in"):
            trimmed_cross_entropy(x, t, trim)
    with pytest.raises(TypeError, match="trim must be a float"):
        trimmed_cross_entropy(x, t, "0.1")
    with pytest.raises(ValueError, match="reduction"):
        trimmed_cross_entropy(x, t, reduction="max")
    with pytest.raises(TypeError, match="float32 or float64 on the CPU"):
        trimmed_cross_entropy(x.int(), t)
    with pytest.raises(TypeError, match="integer class indices"):
        trimmed_cross_entropy(x, t.float())
    with pytest.raises(TypeError, match="integer class indices"):
        trimmed_cross_entropy(x, t > 0)
    with pytest.raises(ValueError, match="target must have shape \\(6,\\)"):
        trimmed_cross_entropy(x, t[:5])
    with pytest.raises(ValueError, match="target must have shape"):
        trimmed_cross_entropy(x, t[:, None])
    with pytest.raises(ValueError, match="first 4 at row 2"):
        trimmed_cross_entropy(x, torch.tensor([0, 1, 4, 3, 0, 1]))
    with pytest.raises(ValueError, match="first -1 at row 5"):
        trimmed_cross_entropy(x, torch.tensor([0, 1, 2, 3, 0, -1]))
    with pytest.raises(ValueError, match="\\[B, C\\]"):
        trimmed_cross_entropy(torch.randn(4), torch.tensor(1))
    with pytest.raises(ValueError, match="at least one class"):
        trimmed_cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch tensors"):
        trimmed_cross_entropy(x.numpy(), t)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        trimmed_cross_entropy_forward([[0.0, 1.0]], [0])
    with pytest.raises(TypeError, match="float32 or float64"):
        trimmed_cross_entropy_forward(np.zeros((2, 3), dtype=np.int32), np.zeros(2, dtype=np.int64))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        trimmed_cross_entropy(x, t, ignore_index=1.5)
    with pytest.raises(TypeError, match="floating point"):
        trimmed_loss(torch.arange(4), 0.1)


def test_kernel_repeats_checks():
    # The C++ entry points check what reaches them directly.
    x = np.zeros((3, 4, 1), dtype=np.float32)
    core = poisonguard._core
    with pytest.raises(ValueError, match="target must be in"):
        core.trimmed_cross_entropy_forward(x, np.array([0, 5, 1]), -100, 1)
    with pytest.raises(ValueError, match="k must be in"):
        core.trimmed_cross_entropy_forward(x, np.array([0, 1, 1]), -100, 4)
    with pytest.raises(TypeError):
        core.trimmed_cross_entropy_forward(x.astype(np.float16), np.array([0, 1, 1]), -100, 1)
    with pytest.raises(ValueError, match="3-D"):
        core.trimmed_cross_entropy_forward(x[:, :, 0], np.array([0, 1, 1]), -100, 1)


def test_package_imports_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import poisonguard
        try:
            import poisonguard.torch
        except ImportError as e:
            assert "optional dependency" in str(e), e
            print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# -- CUDA against the CPU kernel -------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and poisonguard.has_cuda()),
    reason="needs a CUDA device and poisonguard built with POISONGUARD_CUDA=ON",
)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_matches_cpu(dtype, layout, reduction):  # pragma: no cover - needs a GPU
    g = torch.Generator().manual_seed(14)
    if layout == "spatial":
        x = torch.randn(40, 9, 5, generator=g, dtype=torch.float64)
        t = torch.randint(0, 9, (40, 5), generator=g)
    else:
        x = torch.randn(500, 129, generator=g, dtype=torch.float64) * 3
        t = torch.randint(0, 129, (500,), generator=g)
        if layout == "transposed":
            x = x.T.contiguous().T
    t.view(-1)[::7] = -100
    x[0, 0] = 1e4
    xd = x.to(getattr(torch, dtype)).cuda()
    xd = xd if layout != "transposed" else xd.T.contiguous().T
    x_cpu = xd.cpu().to(torch.float64)  # the rounded values the device kernel sees
    gout = (
        torch.rand((), dtype=torch.float64) + 0.5 if reduction == "mean" else torch.rand(t.shape, dtype=torch.float64)
    )
    v, grad, keep = run(xd, t.cuda(), 0.2, reduction, grad_out=gout.to(xd.dtype).cuda())
    rv, rgrad, rkeep = run(x_cpu, t, 0.2, reduction, grad_out=gout.to(xd.dtype).double())
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    assert rel(v.cpu(), rv.numpy()) <= tol
    assert rel(grad.cpu(), rgrad.numpy()) <= tol * 4
    if dtype in ("float32", "float64"):
        assert torch.equal(keep.cpu(), rkeep)
    else:  # rankings can differ only between rows whose losses are within the rounding
        assert int(keep.sum()) == int(rkeep.sum())


@pytest.mark.cuda
@needs_cuda
def test_cuda_ties_empty_and_determinism():  # pragma: no cover - needs a GPU
    x = torch.zeros(10, 4, dtype=torch.float32, device="cuda")
    t = torch.tensor([0, 1, 2, 3, -100, 0, 1, 2, 3, 0], device="cuda")
    _, _, keep = run(x, t, 0.5)
    assert keep.cpu().tolist() == [True, True, True, True, False, True, False, False, False, False]
    v, grad, keep = run(torch.zeros(0, 3, device="cuda"), torch.zeros(0, dtype=torch.int64, device="cuda"), 0.1)
    assert float(v) == 0 and grad.shape == (0, 3)
    v, grad, keep = run(torch.randn(6, 3, device="cuda"), torch.full((6,), -100, device="cuda"), 0.1)
    assert float(v) == 0 and not grad.any() and not keep.any()
    g = torch.Generator().manual_seed(15)
    x = torch.randn(20000, 100, generator=g).cuda()
    t = torch.randint(0, 100, (20000,), generator=g).cuda()
    a, ga, _ = run(x, t, 0.1)
    b, gb, _ = run(x, t, 0.1)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    with pytest.raises(ValueError, match="target must be in"):
        trimmed_cross_entropy(x[:3], torch.tensor([0, 100, 1], device="cuda"))


# -- the example ---------------------------------------------------------------------------------------------------
def test_example_runs_small():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trimmed_training.py"
    spec = importlib.util.spec_from_file_location("trimmed_training_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kw = {"epochs": 1, "trims": (0.2,), "n_samples": 250, "verbose": False}
    a = mod.main(**kw)
    assert [r["loss"] for r in a] == ["CE", "CE", "trimmed CE, trim=0.2"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in a)
    assert a[2]["dropped"] > 0 and 0.0 <= a[2]["flipped_among_dropped"] <= 1.0
    assert mod.main(**kw) == a  # deterministic for a seed
