"""Package surface: version, build information, threads, the CLI and the CUDA entry points of a CPU-only build."""

from __future__ import annotations

import json
import re

import numpy as np
import poisonguard
import pytest
from poisonguard import _core
from poisonguard.cli import main
from poisonguard.ops import StreamingCovariance

torch = pytest.importorskip("torch")

INFO_KEYS = {"version", "cuda", "cuda_version", "cuda_devices", "blas", "blas_threads", "threads", "compiler"}


def test_version():
    assert isinstance(poisonguard.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-].*)?", poisonguard.__version__)
    assert poisonguard.__version__ == _core.__version__
    from importlib.metadata import version

    assert version("poisonguard") == poisonguard.__version__


def test_public_names():
    for name in poisonguard.__all__:
        assert hasattr(poisonguard, name), name
    assert poisonguard.StreamingCovariance is StreamingCovariance
    assert poisonguard.randomized_svd is poisonguard.ops.randomized_svd
    assert poisonguard.top_eigh is poisonguard.ops.top_eigh


def test_has_cuda_is_bool():
    value = poisonguard.has_cuda()
    assert isinstance(value, bool)
    assert value == (bool(_core.built_with_cuda()) and _core.cuda_device_count() > 0)


def test_build_info():
    info = poisonguard.build_info()
    assert set(info) >= INFO_KEYS
    assert info["version"] == poisonguard.__version__
    assert isinstance(info["cuda"], bool) and info["cuda"] == _core.built_with_cuda()
    assert (info["cuda_version"] is None) == (not info["cuda"])
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    assert isinstance(info["blas"], str) and "OpenBLAS" in info["blas"]
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert isinstance(info["blas_threads"], int) and info["blas_threads"] >= 1
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["cpu_isa"] in ("avx2", "x86-64", "other")
    assert info["sqgemm_isa"] == _core.sqgemm_isa() and info["sqgemm_isa"] in ("avx512", "avx2", "none")
    json.dumps(info)  # plain values only


def test_cpu_only_build_here():
    # This test machine has no CUDA: the build must still import and say so.
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert poisonguard.has_cuda() is False
    assert poisonguard.build_info()["cuda_devices"] == 0


@pytest.fixture
def restore_threads():
    threads, blas = _core.get_num_threads(), _core.blas_get_num_threads()
    yield
    _core.set_num_threads(threads)
    _core.blas_set_num_threads(blas)


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_set_num_threads_round_trip(n):
    poisonguard.set_num_threads(n)
    assert poisonguard.get_num_threads() == n
    assert _core.blas_get_num_threads() == n
    assert poisonguard.build_info()["threads"] == n
    # the kernels still give the same statistics with any thread count
    rng = np.random.default_rng(60)
    x = rng.standard_normal((3000, 9)) + 1.0
    got = StreamingCovariance(9).update(x).covariance()[0]
    np.testing.assert_allclose(got, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("restore_threads")
def test_set_num_threads_zero_means_all_cores():
    import os

    poisonguard.set_num_threads(1)
    poisonguard.set_num_threads(0)
    assert poisonguard.get_num_threads() == os.cpu_count()
    assert _core.blas_get_num_threads() == os.cpu_count()


def test_set_num_threads_negative():
    with pytest.raises(ValueError, match="num_threads"):
        poisonguard.set_num_threads(-1)


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in INFO_KEYS | {"has_cuda"}:
        assert re.search(rf"^{key}\s", out, re.MULTILINE), f"{key} missing from:\n{out}"
    assert poisonguard.__version__ in out


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert INFO_KEYS | {"has_cuda"} <= set(info)
    assert info["version"] == poisonguard.__version__
    assert info["has_cuda"] is poisonguard.has_cuda()


@pytest.mark.parametrize("argv", [[], ["nope"], ["info", "--yaml"]])
def test_cli_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_cuda_entry_point_raises_without_cuda():
    if _core.built_with_cuda():
        pytest.skip("this build has the CUDA kernels")
    count = np.zeros(1, np.int64)
    mean = np.zeros((1, 4))
    m2 = np.zeros((1, 4, 4))
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _core.covariance_update_cuda(0, 0, 4, 4, 1, 2, 0, 1, count.ctypes.data, mean.ctypes.data, m2.ctypes.data, 0)
    assert count[0] == 0 and not mean.any() and not m2.any()


def test_update_with_cuda_tensor_without_cuda_build():
    # A CPU-only build refuses CUDA tensors with a RuntimeError that says how to fix it.
    if _core.built_with_cuda():
        pytest.skip("this build has the CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to make a CUDA tensor")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        StreamingCovariance(3).update(torch.zeros(2, 3, device="cuda"))


@pytest.mark.cuda
def test_update_with_cuda_tensor():
    rng = np.random.default_rng(61)
    x = rng.standard_normal((500, 7)).astype(np.float32) + 2.0
    g = rng.integers(0, 3, size=500)
    gpu = StreamingCovariance(7, 3).update(torch.from_numpy(x).cuda(), torch.from_numpy(g).cuda())
    cpu = StreamingCovariance(7, 3).update(x, g)
    np.testing.assert_array_equal(gpu.count, cpu.count)
    np.testing.assert_allclose(gpu.covariance(), cpu.covariance(), rtol=1e-5, atol=1e-6)


def test_cuda_marker_is_skipped_here(request):
    # conftest skips @pytest.mark.cuda tests without a usable CUDA build; check the hook did it for the test above.
    if torch.cuda.is_available() and poisonguard.has_cuda():
        pytest.skip("CUDA is usable: the cuda tests run")
    items = [i for i in request.session.items if i.name == "test_update_with_cuda_tensor"]
    assert items, "test_update_with_cuda_tensor not collected"
    assert any(m.name == "skip" for m in items[0].iter_markers())
