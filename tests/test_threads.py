"""poisonguard's parallel loops on torch's OpenMP runtime (poisonguard.torch routes them there) give the same bits as
on threads of our own, from several Python threads at once, and the switch is explicit and reversible."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import poisonguard as pg  # noqa: E402
from poisonguard import _core  # noqa: E402
from poisonguard.ops.gradnorm import linear_grad_bookkeeping  # noqa: E402
from poisonguard.torch import _threads  # noqa: E402

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's libgomp is found on Linux")


def _work(rng_seed: int):
    rng = np.random.default_rng(rng_seed)
    a = rng.standard_normal((97, 33, 21)).astype(np.float32)
    g = rng.standard_normal((97, 33, 18)).astype(np.float32)
    cov = pg.ops.StreamingCovariance(21).update(a.reshape(-1, 21)).covariance()
    return linear_grad_bookkeeping(a, g, bias=True, bias_grad=True), cov


def _same(x, y) -> bool:
    if isinstance(x, (tuple, list)):
        return all(_same(u, v) for u, v in zip(x, y, strict=True))
    if x is None or y is None:
        return x is y
    return np.array_equal(np.asarray(x), np.asarray(y))


@linux_only
def test_loops_run_on_torch_openmp_and_match_own_threads():
    assert _threads.share_torch_openmp() and _core.openmp_runtime_set()
    before = pg.get_num_threads()
    saved = [_core.set_openmp_runtime(0, 0, 0)]  # off: threads of our own
    try:
        pg.set_num_threads(3)
        own = _work(0)
        assert not _core.openmp_runtime_set()
        assert _threads.share_torch_openmp() and _core.openmp_runtime_set()
        shared = _work(0)
        assert _same(own, shared)  # the same ranges, summed in the same order
    finally:
        pg.set_num_threads(before)
        assert saved == [True]


@linux_only
def test_openmp_loops_from_several_python_threads():
    _threads.share_torch_openmp()
    want = [_work(s) for s in range(4)]
    got: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(s):
        try:
            for _ in range(3):
                got[s] = _work(s)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(_same(got[s], want[s]) for s in range(4))


def test_openmp_runtime_errors_surface():
    _threads.share_torch_openmp()
    if _core.openmp_runtime_set():
        with pytest.raises(ValueError, match="already set"):
            _core.set_openmp_runtime(1, 1, 1)
    # an error raised inside a parallel range reaches Python whichever runtime runs it
    with pytest.raises(ValueError):
        linear_grad_bookkeeping(np.zeros((4, 3, 2), np.float32), np.zeros((4, 2, 2), np.float32))


@linux_only
def test_own_threads_on_request():
    code = "import poisonguard.torch, poisonguard._core as c; print(c.openmp_runtime_set())"
    env = dict(os.environ, POISONGUARD_OWN_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _child(q):
    q.put(_same(_work(1), _work(1)))


@linux_only
def test_forked_child_runs_loops_on_its_own_threads():
    import multiprocessing as mp

    _threads.share_torch_openmp()
    pg.set_num_threads(2)
    _work(1)  # the parent's OpenMP pool is started
    torch.ones(1 << 16).sum()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:  # pragma: no cover - the failure this guards against: a child hung in libgomp
        p.kill()
    pg.set_num_threads(0)
    assert not alive and p.exitcode == 0 and q.get(timeout=5)
