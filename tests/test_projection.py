"""project_scores (fused centre-project-score kernel) against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_input, to_float64
from poisonguard._reference import _project_scores
from poisonguard.ops import project_scores

TOL = {"float64": 1e-12, "float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}


def _case(rng, n, d, g, k, offset=0.0):
    x = rng.standard_normal((n, d)) + offset
    groups = rng.integers(0, g, n)
    means = rng.standard_normal((g, d)) + offset
    dirs = np.linalg.qr(rng.standard_normal((g, d, k)))[0] if d >= k else rng.standard_normal((g, d, k))
    que = rng.standard_normal((g, k, k))
    que = que @ que.transpose(0, 2, 1)
    return x, groups, means, dirs, que


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("n", "d", "g", "k"), [(1, 1, 1, 1), (7, 3, 2, 1), (600, 33, 5, 4), (1000, 64, 3, 16)])
def test_matches_reference(rng, dtype, n, d, g, k):
    x, groups, means, dirs, que = _case(rng, n, d, g, k)
    lib = "torch" if dtype == "bfloat16" else "numpy"
    xi = make_input(x, lib, dtype)
    xr = to_float64(xi)  # the rounded values the kernel sees
    p_ref, s_ref, q_ref = _project_scores(xr, groups, means, dirs, que)
    p, s, q = project_scores(xi, groups, means, dirs, que=que)
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(p_ref).max()))
    np.testing.assert_allclose(to_float64(p), p_ref, rtol=0, atol=tol * scale * 4)
    np.testing.assert_allclose(s, s_ref, rtol=tol * 8, atol=tol * scale**2 * 8)
    np.testing.assert_allclose(q, q_ref, rtol=tol * 8, atol=tol * scale**2 * 8 * np.abs(que).max())


def test_large_offset_is_centred_in_float64(rng):
    # x and the means sit at 1e4; centring in float64 before the float32 product keeps ~1e-7 relative accuracy.
    x, groups, means, dirs, _ = _case(rng, 500, 16, 3, 2, offset=1e4)
    x32 = x.astype(np.float32)
    _, s_ref, _ = _project_scores(x32.astype(np.float64), groups, means, dirs)
    _, s, _ = project_scores(x32, groups, means, dirs)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-4)


def test_non_contiguous_and_no_projections(rng):
    x, groups, means, dirs, _ = _case(rng, 300, 20, 4, 3)
    big = np.zeros((600, 40))
    big[::2, ::2] = x
    view = big[::2, ::2]
    p, s, q = project_scores(view, groups, means, dirs, return_projections=False)
    assert p is None and q is None
    _, s_ref, _ = _project_scores(x, groups, means, dirs)
    np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-12)


def test_empty_and_single_class(rng):
    x, _, means, dirs, _ = _case(rng, 50, 6, 1, 2)
    p, s, _ = project_scores(x[:0], None, means, dirs)
    assert p.shape == (0, 2) and s.shape == (0,)
    p, s, _ = project_scores(x, None, means, dirs)
    _, s_ref, _ = _project_scores(x, None, means, dirs)
    np.testing.assert_allclose(s, s_ref, rtol=1e-12)


def test_torch_input_gives_torch_projections(rng):
    import torch

    x, groups, means, dirs, _ = _case(rng, 40, 5, 2, 2)
    p, s, _ = project_scores(torch.from_numpy(x), torch.from_numpy(groups), means, dirs)
    assert isinstance(p, torch.Tensor) and isinstance(s, np.ndarray)


def test_bad_input(rng):
    x, groups, means, dirs, que = _case(rng, 30, 5, 2, 2)
    with pytest.raises(ValueError, match="means must be"):
        project_scores(x, groups, means[:, :3], dirs)
    with pytest.raises(ValueError, match="directions must be"):
        project_scores(x, groups, means, dirs[:1])
    with pytest.raises(ValueError, match="que must be"):
        project_scores(x, groups, means, dirs, que=que[:, :1])
    with pytest.raises(ValueError, match="outside"):
        project_scores(x, groups + 5, means, dirs)
    with pytest.raises(ValueError, match="groups is required"):
        project_scores(x, None, means, dirs)
    with pytest.raises(TypeError, match="floating"):
        project_scores(x, groups, means.astype(np.int64), dirs)
    with pytest.raises(TypeError):
        project_scores(x.astype(np.int32), groups, means, dirs)
