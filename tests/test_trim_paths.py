"""Trimmed cross-entropy: the kernel's special paths against the float64 reference and against each other.

float32 logits of at most 16 classes take the 8-rows-at-a-time forward pass (the last block padded) and, when rows
are stored back to back, the flat gradient kernel (the last partial block row by row); the k kept rows are found
through a histogram of the losses. Each must match the reference, keep the tie rule, and give the same bits for
every thread split.
"""

from __future__ import annotations

import math

import numpy as np
import poisonguard
import pytest
from poisonguard._reference import _trimmed_cross_entropy
from poisonguard.ops.trim import keep_count, trimmed_cross_entropy_forward

torch = pytest.importorskip("torch")
from poisonguard.torch import trimmed_cross_entropy  # noqa: E402


def rel(got, want, floor: float = 0.0) -> float:
    got = np.asarray(got.detach().double() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    return float(np.linalg.norm(got - want)) / max(float(np.linalg.norm(want)), floor, 1e-300)


def run(x, t, trim, reduction="mean", ignore_index=-100, grad_out=None):
    x = x.detach().requires_grad_(True)
    v, keep = trimmed_cross_entropy(x, t, trim, reduction=reduction, ignore_index=ignore_index, return_kept=True)
    v.backward(torch.ones_like(v) if grad_out is None else grad_out)
    return v.detach(), x.grad, keep


def check32(x, t, trim, reduction="mean", ignore_index=-100, grad_out=None, x_ref=None):
    """float32 value, gradient and kept rows against the float64 reference (same tolerances as test_trim); x_ref:
    what the reference reads instead of x (x with its ignored rows cleaned)."""
    v, g, keep = run(x, t, trim, reduction, ignore_index, grad_out)
    rv, rg, rk = _trimmed_cross_entropy(x if x_ref is None else x_ref, t, trim, ignore_index, reduction)
    if grad_out is not None:
        rg = rg * grad_out.double().numpy().reshape(rg.shape[:1] + (1,) * (rg.ndim - 1))
    np.testing.assert_array_equal(keep.numpy(), rk)
    assert rel(v, rv, floor=1.0) <= 2e-6
    assert rel(g, rg, floor=1.0 / max(int(rk.sum()), 1)) <= 8e-6
    return v, g, keep


def logits(b, c, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) * scale).to(dtype), g


# -- few classes: 8 rows at a time -----------------------------------------------------------------------------------
@pytest.mark.parametrize("c", list(range(1, 18)))
@pytest.mark.parametrize("b", [1, 7, 8, 9, 45])
def test_few_classes_match_reference(c, b):
    x, g = logits(b, c, 100 * c + b)
    t = torch.randint(0, c, (b,), generator=g)
    clean = x.clone()
    if b > 2:
        t[1::4] = -100  # ignored rows in every block, their logits garbage
        x[1::4] = torch.where(torch.rand(x[1::4].shape, generator=g) < 0.5, math.nan, math.inf)
    for reduction in ("mean", "sum", "none"):
        check32(x, t, 0.3, reduction, x_ref=clean)


@pytest.mark.parametrize("c", [3, 8, 11, 16])
def test_few_classes_per_row_grad_output(c):
    x, g = logits(37, c, c)
    t = torch.randint(0, c, (37,), generator=g)
    w = torch.randn(37, generator=g)
    check32(x, t, 0.2, "none", grad_out=w)


@pytest.mark.parametrize("c", [5, 12])
@pytest.mark.parametrize("layout", ["offset_cols", "sliced_rows", "transposed", "positions_last"])
def test_few_classes_layouts(c, layout):
    # Rows not back to back take the row-by-row gradient (or the scalar path for a class stride != 1); the values
    # must not depend on it.
    g = torch.Generator().manual_seed(c)
    b = 29
    if layout == "offset_cols":
        x = torch.randn(b, c + 3, generator=g)[:, 3:]
    elif layout == "sliced_rows":
        x = torch.randn(2 * b, c, generator=g)[::2]
    elif layout == "transposed":
        x = torch.randn(c, b, generator=g).T
    else:  # [B, C, d] stored as [B, d, C]: rows are back to back, one per (b, position)
        x = torch.randn(b, 3, c, generator=g).permute(0, 2, 1)
    x = x * 3
    t = torch.randint(0, c, (x.shape[0], *x.shape[2:]), generator=g)
    t.view(-1)[::5] = -100
    v, grad, keep = check32(x, t, 0.25)
    vc, gc, kc = run(x.contiguous(), t, 0.25)
    assert torch.equal(kc, keep) and abs(float(vc) - float(v)) <= 1e-6 * abs(float(v))
    assert rel(grad, gc.numpy()) <= 1e-6


def test_few_classes_numpy_negative_row_stride():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((50, 6)) * 3).astype(np.float32)[::-1]
    t = rng.integers(0, 6, 50)
    state, *_ = trimmed_cross_entropy_forward(x, t, 0.2)
    rv, _, rk = _trimmed_cross_entropy(x, t, 0.2)
    np.testing.assert_array_equal(state.keep, rk)
    assert abs(state.total / state.k - rv) <= 2e-6 * abs(rv)


def test_few_classes_extreme_and_minus_inf():
    x = torch.tensor(
        [[0.0, -math.inf, 1.0], [2.0, 0.0, -math.inf], [1e4, -1e4, 0.0], [-80.0, 0.0, -math.inf], [0.5, 0.2, 0.1]]
    )
    t = torch.tensor([0, 2, 1, 0, 1])  # row 1 targets a -inf logit (infinite loss), row 2 loses 1e4
    v, grad, keep = run(x, t, 0.4)
    assert keep.tolist() == [True, False, False, True, True] and math.isfinite(float(v))
    rv, rg, _ = _trimmed_cross_entropy(x, t, 0.4)
    assert abs(float(v) - rv) <= 2e-6 * abs(rv) and rel(grad, rg) <= 8e-6
    assert grad[0, 1] == 0 and grad[3, 2] == 0  # exp(-inf) is exactly 0
    v, _, _ = run(x, t, 0.0)
    assert math.isinf(float(v))


@pytest.mark.parametrize("c", [4, 13])
def test_few_classes_bad_rows_raise(c):
    x, g = logits(21, c, 1)
    t = torch.randint(0, c, (21,), generator=g)
    for bad, row in ((math.nan, 17), (math.inf, 9), (-math.inf, 20)):
        y = x.clone()
        y[row] = bad if bad == -math.inf else y[row]
        y[row, c - 1] = bad
        with pytest.raises(ValueError, match=f"row {row} holds NaN or \\+inf"):
            trimmed_cross_entropy(y, t, 0.2)
        u = t.clone()
        u[row] = -100
        trimmed_cross_entropy(y, u, 0.2)  # ignored: never checked


# -- thread splits ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("b", "c"), [(20001, 3), (8195, 10), (6003, 16), (3001, 17), (300, 300)])
def test_same_bits_for_every_thread_count(b, c):
    x, g = logits(b, c, b)
    t = torch.randint(0, c, (b,), generator=g)
    t[::7] = -100
    n = poisonguard.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            poisonguard.set_num_threads(threads)
            results.append(run(x, t, 0.1))
    finally:
        poisonguard.set_num_threads(n)
    for v, grad, keep in results[1:]:
        assert torch.equal(v, results[0][0]) and torch.equal(grad, results[0][1]) and torch.equal(keep, results[0][2])


# -- selection -------------------------------------------------------------------------------------------------------
def stable_selection(loss, valid, k):
    idx = np.flatnonzero(valid)
    keep = np.zeros(loss.shape, dtype=bool)
    keep[idx[np.argsort(loss[idx], kind="stable")[:k]]] = True
    return keep


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["spread", "ties", "one_value", "huge_range"])
@pytest.mark.parametrize("trim", [0.0, 0.001, 0.5, 0.9999])
def test_selection_matches_stable_sort(dtype, kind, trim):
    rng = np.random.default_rng(hash((kind, trim)) % 2**32)
    n, c = 30000, 4
    if kind == "spread":
        x = rng.standard_normal((n, c)) * 3
    elif kind == "ties":
        x = np.round(rng.standard_normal((n, c)) * 2)  # few distinct rows: many equal losses
    elif kind == "one_value":
        x = np.zeros((n, c))
    else:
        x = rng.standard_normal((n, c)) * 10.0 ** rng.integers(-6, 5, (n, 1))
    x = x.astype(dtype)
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.1] = -100
    state, *_ = trimmed_cross_entropy_forward(x, t, trim)
    valid = t != -100
    k = keep_count(int(valid.sum()), trim)
    assert state.k == k and int(state.keep.sum()) == k
    np.testing.assert_array_equal(state.keep, stable_selection(state.loss, valid, k))
    assert state.total == pytest.approx(float(state.loss[state.keep].sum()), rel=1e-12)


def test_selection_extremes_k_one_and_all():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 3)).astype(np.float32)
    x[10] = [0.0, -np.inf, 0.0]
    t = rng.integers(0, 3, 1000)
    t[10] = 1  # an infinite loss: last in the order
    for trim, k in ((0.0, 1000), (0.999, 1), (0.5, 500)):
        state, *_ = trimmed_cross_entropy_forward(x, t, trim)
        assert state.k == k
        np.testing.assert_array_equal(state.keep, stable_selection(state.loss, np.ones(1000, bool), k))
    assert np.isinf(state.loss[10]) and not state.keep[10]


def test_kept_mask_only_backward():
    # The mask is not differentiable: backward through the loss alone, and a loss without grad, both work.
    x, g = logits(40, 5, 2)
    t = torch.randint(0, 5, (40,), generator=g)
    x.requires_grad_(True)
    out, keep = trimmed_cross_entropy(x, t, 0.2, return_kept=True)
    assert not keep.requires_grad
    (out * 2).backward()
    ref = x.grad.clone()
    x.grad = None
    trimmed_cross_entropy(x, t, 0.2).backward()
    assert torch.allclose(ref, 2 * x.grad)
