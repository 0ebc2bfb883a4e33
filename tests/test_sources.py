"""Chunked readers: views without copies, memmap pages released, no pickle."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
from poisonguard.sources import iter_row_chunks, open_npy


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_iter_row_chunks_covers_rows_in_order(chunk):
    x = np.arange(300 * 3, dtype=np.float32).reshape(300, 3)
    seen = []
    for c, s in iter_row_chunks(x, chunk):
        assert np.shares_memory(c, x)  # a view, not a copy
        np.testing.assert_array_equal(c, x[s : s + chunk])
        seen.append((s, len(c)))
    assert [s for s, _ in seen] == list(range(0, 300, chunk))
    assert sum(n for _, n in seen) == 300


def test_iter_row_chunks_empty_and_bad_chunk():
    assert list(iter_row_chunks(np.zeros((0, 4), np.float32), 10)) == []
    with pytest.raises(ValueError, match="chunk_rows"):
        list(iter_row_chunks(np.zeros((3, 4)), 0))
    with pytest.raises(TypeError, match="chunk_rows"):
        list(iter_row_chunks(np.zeros((3, 4)), 2.5))


def test_open_npy_memmap_and_page_release(tmp_path):
    path = tmp_path / "a.npy"
    rows, d = 20000, 256  # 20 MB
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    mm[:] = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    mm.flush()
    del mm
    x = open_npy(path)
    assert isinstance(x, np.memmap) and x.shape == (rows, d)
    proc = psutil.Process()
    total = 0.0
    rss = []
    for chunk, _ in iter_row_chunks(x, 1000):
        total += float(chunk.sum(dtype=np.float64))
        rss.append(proc.memory_info().rss)
    ref = float(np.load(path).sum(dtype=np.float64))
    assert total == pytest.approx(ref, rel=1e-9)
    # Pages are dropped after each chunk: resident memory grows by far less than the 20 MB file.
    assert max(rss) - rss[0] < 10 * 2**20


def test_open_npy_refuses_pickled_objects(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        open_npy(path)


def test_iter_row_chunks_non_contiguous_memmap(tmp_path):
    path = tmp_path / "b.npy"
    np.save(path, np.arange(200, dtype=np.float64).reshape(50, 4))
    x = open_npy(path)[::-1, ::2]  # negative row stride, strided columns: release must not fail
    got = np.concatenate([c for c, _ in iter_row_chunks(x, 7)])
    np.testing.assert_array_equal(got, np.arange(200, dtype=np.float64).reshape(50, 4)[::-1, ::2])
