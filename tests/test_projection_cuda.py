"""project_scores on CUDA tensors against the CPU kernel fed the same values (the CPU kernel is the reference).
Skipped without torch, a CUDA device or a CUDA build."""

from __future__ import annotations

import numpy as np
import poisonguard
import pytest
from poisonguard.ops import project_scores

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and poisonguard.has_cuda()),
        reason="needs a CUDA device and poisonguard built with POISONGUARD_CUDA=ON",
    ),
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
TOL = {"float16": 1e-5, "bfloat16": 1e-5, "float32": 1e-5, "float64": 1e-12}


def _case(rng, n, d, g, k, offset):
    x = rng.standard_normal((n, d)) + offset
    groups = rng.integers(0, g, n)
    means = rng.standard_normal((g, d)) + offset
    dirs = rng.standard_normal((g, d, k)) / np.sqrt(d)
    que = rng.standard_normal((g, k, k))
    return x, groups, means, dirs, que @ que.transpose(0, 2, 1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("n", "d", "g", "k"), [(1, 1, 1, 1), (37, 5, 3, 2), (3000, 130, 7, 9), (500, 64, 2, 40)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_cuda_matches_cpu(rng, dtype, n, d, g, k, layout):
    x, groups, means, dirs, que = _case(rng, n, d, g, k, 8.0)
    xt = torch.tensor(x).to(DTYPES[dtype])
    if layout == "strided":
        xt = torch.tensor(np.repeat(x, 2, axis=1)).to(DTYPES[dtype])[:, ::2]
    elif layout == "transposed":
        xt = xt.t().contiguous().t()
    p_ref, s_ref, q_ref = project_scores(xt, groups, means, dirs, que=que)
    p, s, q = project_scores(xt.cuda(), torch.tensor(groups).cuda(), means, dirs, que=que)
    p_ref = p_ref.numpy() if hasattr(p_ref, "numpy") else p_ref
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(p_ref).max()))
    np.testing.assert_allclose(p.cpu().numpy(), p_ref, rtol=0, atol=tol * scale * 8)
    np.testing.assert_allclose(s.cpu().numpy(), s_ref, rtol=tol * 16, atol=tol * scale**2 * 16)
    np.testing.assert_allclose(q.cpu().numpy(), q_ref, rtol=tol * 16, atol=tol * scale**2 * 16 * np.abs(que).max())


def test_cuda_empty_and_no_projections(rng):
    x, groups, means, dirs, _ = _case(rng, 0, 4, 2, 1, 0.0)
    p, s, q = project_scores(torch.zeros((0, 4), device="cuda"), torch.zeros(0, dtype=torch.int64), means, dirs)
    assert p.shape == (0, 1) and s.shape == (0,) and q is None
    x, groups, means, dirs, _ = _case(rng, 50, 4, 2, 3, 0.0)
    p, s, _ = project_scores(torch.tensor(x).cuda(), groups, means, dirs, return_projections=False)
    assert p is None
    np.testing.assert_allclose(s.cpu().numpy(), project_scores(x, groups, means, dirs)[1], rtol=1e-12)


def test_cuda_bad_input(rng):
    x, groups, means, dirs, _ = _case(rng, 10, 4, 2, 1, 0.0)
    xt = torch.tensor(x).cuda()
    with pytest.raises(ValueError, match="groups must be in"):
        project_scores(xt, np.full(10, 7), means, dirs)
    with pytest.raises(ValueError, match="at most 256"):
        project_scores(xt, groups, means, np.zeros((2, 4, 300)))
