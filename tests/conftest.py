"""Shared fixtures and helpers: a fixed-seed generator, the per-dtype tolerance table and input makers.

Tolerances are relative Frobenius errors against the float64 reference computed on the SAME input values (already
rounded to the input dtype), so they measure the kernels' arithmetic, not the rounding of the input.
"""

from __future__ import annotations

import numpy as np
import poisonguard
import pytest

try:
    import torch
except ImportError:  # pragma: no cover - torch is an optional dependency
    torch = None

# Input dtypes: numpy has no bfloat16, so that one only exists as a torch tensor.
NUMPY_DTYPES = ("float16", "float32", "float64")
TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Every (library, dtype) pair an op accepts on the host.
ALL_INPUTS = [("numpy", dt) for dt in NUMPY_DTYPES] + [("torch", dt) for dt in TORCH_DTYPES]
INPUT_IDS = [f"{lib}-{dt}" for lib, dt in ALL_INPUTS]

# Relative Frobenius error against float64 on the same (rounded) values. Everything narrower than float64 is
# computed in float32.
TOL = {"float64": 1e-10, "float32": 2e-6, "float16": 2e-6, "bfloat16": 2e-6}


def _torch_dtype(dtype: str):
    return getattr(torch, dtype)


def make_input(values: np.ndarray, lib: str, dtype: str):
    """``values`` (float64) rounded to ``dtype``, as a numpy array (``lib="numpy"``) or a CPU torch tensor."""
    values = np.asarray(values, dtype=np.float64)
    if lib == "numpy":
        if dtype == "bfloat16":
            raise ValueError("numpy has no bfloat16")
        return values.astype(dtype)
    if lib == "torch":
        if torch is None:
            pytest.skip("torch is not installed")
        return torch.from_numpy(values).to(_torch_dtype(dtype))
    raise ValueError(f"unknown lib {lib!r}")


def to_float64(x) -> np.ndarray:
    """The exact values of a numpy array or torch tensor (bfloat16 included) as float64 numpy."""
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_fro(got, want) -> float:
    """Relative Frobenius error ``‖got − want‖ / ‖want‖`` (absolute error when ``want`` is all zeros)."""
    got = to_float64(got)
    want = to_float64(want)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    err = float(np.linalg.norm(got - want))
    ref = float(np.linalg.norm(want))
    return err / ref if ref > 0 else err


def assert_close(got, want, dtype: str, what: str = "", tol: float | None = None) -> None:
    """NaN patterns must match; the rest within ``TOL[dtype]`` relative Frobenius error (``tol`` overrides)."""
    got = to_float64(got)
    want = to_float64(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern differs")
    ok = ~np.isnan(want)
    limit = TOL[dtype] if tol is None else tol
    err = rel_fro(got[ok], want[ok])
    assert err <= limit, f"{what}: relative Frobenius error {err:.3g} > {limit:.3g} ({dtype})"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    cuda_ok = torch is not None and torch.cuda.is_available() and poisonguard.has_cuda()
    if cuda_ok:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and poisonguard built with POISONGUARD_CUDA=ON")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
