"""Sources (as_source over every kind), read-ahead, labels, and shard folders (writer, manifest, verification)."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from poisonguard.sources import (
    ArraySource,
    ShardSource,
    ShardWriter,
    Source,
    StoreSource,
    as_source,
    load_labels,
    read_manifest,
    write_shards,
)
from poisonguard.sources.base import dtype_name
from poisonguard.sources.shards import default_rows_per_shard

N, D = 103, 5
READER = "poisonguard-source-reader"


def _data(dtype: str = "float32", n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, d)).astype(dtype)


def _as_numpy(c) -> np.ndarray:
    return c.double().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)


def _collect(src: Source, prefetch: bool) -> list[tuple[np.ndarray, int]]:
    """Chunks copied out (buffered sources reuse their buffers) as float64."""
    return [(_as_numpy(c).astype(np.float64), off) for c, off in src.chunks(prefetch=prefetch)]


def _assert_matches(got: list[tuple[np.ndarray, int]], x: np.ndarray, chunk: int, aligned: bool = True) -> None:
    want = np.asarray(x, dtype=np.float64)
    if aligned:
        assert [off for _, off in got] == list(range(0, len(x), chunk))
    pos = 0
    for c, off in got:
        assert off == pos and 0 < len(c) <= chunk
        np.testing.assert_array_equal(c, want[off : off + len(c)])
        pos += len(c)
    assert pos == len(x)


def _no_reader_threads(timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(t.name == READER for t in threading.enumerate()):
            return True
        time.sleep(0.01)
    return False


# -- every kind of source gives the chunks of slicing ------------------------------------------------------------------
def _make(kind: str, x: np.ndarray, tmp: Path, chunk: int, request=None):
    if kind == "numpy":
        return as_source(x, chunk)
    if kind == "npy-path":
        np.save(tmp / "x.npy", x)
        return as_source(str(tmp / "x.npy"), chunk)
    if kind == "memmap":
        np.save(tmp / "x.npy", x)
        return as_source(np.load(tmp / "x.npy", mmap_mode="r"), chunk)
    if kind == "torch":
        return as_source(torch.from_numpy(x), chunk)
    if kind == "shards":
        write_shards(tmp / "s", x, rows_per_shard=2 * chunk)
        return as_source(tmp / "s", chunk)
    if kind == "zarr":
        zarr = pytest.importorskip("zarr")
        z = zarr.create_array(store=str(tmp / "x.zarr"), shape=x.shape, chunks=(chunk, x.shape[1]), dtype=x.dtype)
        z[:] = x
        return as_source(str(tmp / "x.zarr"), chunk)
    if kind == "zarr-array":
        zarr = pytest.importorskip("zarr")
        z = zarr.create_array(store=str(tmp / "y.zarr"), shape=x.shape, chunks=(16, x.shape[1]), dtype=x.dtype)
        z[:] = x
        return as_source(z, chunk)
    if kind == "h5py":
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp / "x.h5", "w") as f:
            f["acts"] = x
        return as_source(tmp / "x.h5", chunk)
    if kind == "h5py-dataset":
        h5py = pytest.importorskip("h5py")
        f = h5py.File(tmp / "y.h5", "w")
        request.addfinalizer(f.close)
        f.create_dataset("g/acts", data=x, chunks=(8, x.shape[1]))
        return as_source(f["g/acts"], chunk)
    raise AssertionError(kind)


KINDS = ["numpy", "npy-path", "memmap", "torch", "shards", "zarr", "zarr-array", "h5py", "h5py-dataset"]


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "inline"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_matches_slicing(kind, dtype, prefetch, tmp_path, request):
    x = _data(dtype)
    with _make(kind, x, tmp_path, 10, request) as src:
        assert isinstance(src, Source)
        assert (src.n_rows, src.n_features, len(src), src.shape) == (N, D, N, (N, D))
        assert src.dtype_name == dtype and src.chunk_rows == 10
        got = _collect(src, prefetch)
        _assert_matches(got, x, 10)
        other = _collect(src, not prefetch)
        assert [o for _, o in other] == [o for _, o in got]
        assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(other, got))
        assert repr(src).startswith(type(src).__name__)


@pytest.mark.parametrize("kind", ["numpy", "memmap", "torch", "shards"])
def test_in_memory_and_mapped_chunks_are_views(kind, tmp_path):
    x = _data()
    src = _make(kind, x, tmp_path, 16)
    for c, off in src.chunks():
        base = src.tensor if kind == "torch" else None
        if base is not None:
            assert c.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        else:
            assert isinstance(c, np.ndarray) and not c.flags.owndata
        assert off % 16 == 0


def test_torch_sources_report_torch_dtype_names():
    for dt in ("float16", "bfloat16", "float32", "float64"):
        t = torch.randn(9, 3).to(getattr(torch, dt))
        src = as_source(t, 4)
        assert src.dtype == dt and src.dtype_name == dt
        got = torch.cat([c for c, _ in src.chunks()])
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert as_source(torch.randn(4, 2, requires_grad=True)).tensor.requires_grad is False


def test_non_contiguous_and_empty_arrays():
    x = _data("float64", 40, 6)[::-1, ::2]
    _assert_matches(_collect(as_source(x, 7), True), x, 7)
    empty = as_source(np.zeros((0, 4), np.float32))
    assert list(empty.chunks()) == [] and list(empty.chunks(prefetch=False)) == []
    assert len(empty) == 0 and empty.n_features == 4


def test_a_source_passes_through_and_bytes_paths(tmp_path):
    src = as_source(_data())
    assert as_source(src) is src
    np.save(tmp_path / "x.npy", _data())
    assert as_source(str(tmp_path / "x.npy").encode()).n_rows == N


# -- read-ahead ------------------------------------------------------------------------------------------------------
class _Scripted(Source):
    """Chunks of zeros; logs each read; optionally fails at one chunk or reads slowly."""

    def __init__(self, n_chunks: int, fail_at: int | None = None, delay: float = 0.0) -> None:
        super().__init__(n_chunks * 2, 3, np.dtype(np.float32), 2)
        self.fail_at, self.delay, self.log = fail_at, delay, []
        self.done: list[int] = []
        self.closed = threading.Event()

    def _read(self, depth):
        try:
            for k in range(self.n_rows // 2):
                time.sleep(self.delay)
                if k == self.fail_at:
                    raise OSError(f"disk error at chunk {k}")
                self.log.append(k)
                yield np.full((2, 3), k, np.float32), 2 * k, (lambda k=k: self.done.append(k))
        finally:
            self.closed.set()


def test_next_chunk_is_read_while_the_consumer_works_and_no_further():
    src = _Scripted(6)
    gen = src.chunks()
    next(gen)
    end = time.monotonic() + 5
    while len(src.log) < 2 and time.monotonic() < end:
        time.sleep(0.005)
    time.sleep(0.05)
    assert src.log == [0, 1]  # chunk 1 read ahead, chunk 2 not (it waits for chunk 0 to be done)
    assert src.done == []
    next(gen)
    end = time.monotonic() + 5
    while len(src.log) < 3 and time.monotonic() < end:
        time.sleep(0.005)
    assert src.log == [0, 1, 2] and src.done == [0]
    assert [o for _, o in gen] == [4, 6, 8, 10]
    assert src.done == [0, 1, 2, 3, 4, 5]
    assert _no_reader_threads()


@pytest.mark.parametrize("prefetch", [True, False])
def test_reader_error_is_raised_in_the_consumer(prefetch):
    src = _Scripted(5, fail_at=3)
    seen = []
    with pytest.raises(OSError, match="disk error at chunk 3"):
        for _, off in src.chunks(prefetch=prefetch):
            seen.append(off)
    assert seen == [0, 2, 4]
    assert src.closed.is_set() and _no_reader_threads()


@pytest.mark.parametrize("how", ["break", "close", "exception"])
def test_early_stop_does_not_hang(how):
    src = _Scripted(1000, delay=0.002)
    result: dict = {}

    def consume():
        try:
            if how == "close":
                gen = src.chunks()
                next(gen)
                gen.close()
            else:
                for _, off in src.chunks():
                    if off == 4:
                        if how == "exception":
                            raise KeyError("stop")
                        break
        except KeyError:
            pass
        result["ok"] = True

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and result == {"ok": True}
    assert src.closed.wait(5) and _no_reader_threads()
    assert len(src.log) <= 5


def test_order_is_deterministic_with_prefetch():
    x = _data(n=1000)
    src = as_source(x, 7)
    runs = [[off for _, off in src.chunks()] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] == list(range(0, 1000, 7))


def test_two_consumers_at_once():
    x = _data(n=200)
    src = as_source(x, 9)
    a, b = src.chunks(), src.chunks()
    for (ca, oa), (cb, ob) in zip(a, b):
        assert oa == ob and np.array_equal(ca, cb)


# -- memory ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["npy", "shards"])
def test_memmap_resident_memory_stays_bounded(kind, tmp_path):
    rows, d = 20000, 256  # 20 MB
    path = tmp_path / "a.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    mm[:] = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    mm.flush()
    del mm
    if kind == "shards":
        write_shards(tmp_path / "s", np.load(path, mmap_mode="r"), rows_per_shard=7000)
        src = as_source(tmp_path / "s", 1000)
    else:
        src = as_source(path, 1000)
    proc = psutil.Process()
    rss, total = [], 0.0
    for chunk, _ in src.chunks():
        total += float(chunk.sum(dtype=np.float64))
        rss.append(proc.memory_info().rss)
    assert total == pytest.approx(float(np.load(path).sum(dtype=np.float64)), rel=1e-9)
    assert max(rss) - rss[0] < 10 * 2**20


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("obj", "exc", "match"),
    [
        ([[1.0, 2.0]], TypeError, r"list.*accepts .*numpy array"),
        (3.5, TypeError, r"float.*accepts"),
        (np.zeros((2, 3, 4), np.float32), ValueError, r"2-D.*\(2, 3, 4\).*reshape"),
        (np.zeros(5, np.float32), ValueError, r"2-D.*\(5,\)"),
        (np.zeros((2, 3), np.int64), TypeError, r"float dtype.*int64"),
        (np.zeros((2, 3), bool), TypeError, r"float dtype.*bool"),
        (np.zeros((2, 3), np.complex64), TypeError, r"float dtype.*complex64"),
        (np.zeros((2, 3), np.longdouble), TypeError, r"float dtype"),
        (np.zeros((2, 3), ">f4"), TypeError, r"byte order"),
        (torch.zeros(2, 3, dtype=torch.int32), TypeError, r"float16, bfloat16, float32 or float64 tensor.*int32"),
        (torch.zeros(2, 3, 4), ValueError, r"2-D.*\(2, 3, 4\)"),
        (torch.zeros(3, 3).to_sparse(), TypeError, r"dense"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, (str, type)) else str(v)[:12],
)
def test_as_source_rejects(obj, exc, match):
    with pytest.raises(exc, match=match):
        as_source(obj)


def test_as_source_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        as_source(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="neither a shard folder"):
        as_source(tmp_path)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"format of .*x\.csv.*'\.csv'"):
        as_source(tmp_path / "x.csv")
    np.save(tmp_path / "x.npy", _data())
    with pytest.raises(ValueError, match="dataset='a' applies to HDF5"):
        as_source(tmp_path / "x.npy", dataset="a")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        as_source(tmp_path / "x.npy", chunk_rows=0)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        as_source(tmp_path / "o.npy")
    write_shards(tmp_path / "s", _data())
    with pytest.raises(ValueError, match="applies to HDF5"):
        as_source(tmp_path / "s", dataset="x")


@pytest.mark.parametrize(("suffix", "package"), [(".h5", "h5py"), ("zarr", "zarr")])
def test_missing_optional_package_names_it(suffix, package, tmp_path, monkeypatch):
    if suffix == "zarr":
        (tmp_path / "z").mkdir()
        (tmp_path / "z" / "zarr.json").write_text("{}")
        path = tmp_path / "z"
    else:
        path = tmp_path / "x.h5"
        path.write_bytes(b"not really hdf5")
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ImportError, match=rf"'{package}'.*pip install {package}"):
        as_source(path)


def test_dtype_name():
    assert dtype_name(np.float16) == "float16"
    assert dtype_name("bfloat16") == "bfloat16"
    assert dtype_name(torch.float64) == "float64"
    assert dtype_name(np.dtype("<f4")) == "float32"
    for bad in ("int8", np.complex64, torch.int64, object(), "floaty"):
        with pytest.raises(TypeError, match="dtype must be one of"):
            dtype_name(bad)


# -- buffered stores -------------------------------------------------------------------------------------------------
class _DuckStore:
    """A minimal array-like: shape, dtype and row slicing (returns copies, like zarr / h5py)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.dtype = x, x.shape, x.dtype
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, sl: slice) -> np.ndarray:
        self.reads.append((sl.start, sl.stop))
        return self.x[sl].copy()


@pytest.mark.parametrize("prefetch", [True, False])
def test_store_source_reuses_buffers(prefetch):
    x = _data("float16", 50, 4)
    store = _DuckStore(x)
    src = StoreSource(store, 8)
    assert src.kind is None and src.dtype == np.float16
    ptrs = []
    got = []
    for c, off in src.chunks(prefetch=prefetch):
        ptrs.append(c.ctypes.data)
        got.append((c.astype(np.float64), off))
    _assert_matches(got, x, 8)
    assert len(set(ptrs)) == (2 if prefetch else 1)  # two buffers with read-ahead, one without
    assert store.reads == [(s, min(s + 8, 50)) for s in range(0, 50, 8)]
    with pytest.raises(TypeError, match="float dtype"):
        StoreSource(_DuckStore(np.zeros((3, 2), np.int32)))


def test_hdf5_dataset_selection_and_close(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = _data()
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["a"] = x
        f["b"] = x[:, :2]
        f["labels"] = np.arange(N)
        f["grp/c"] = x[:10]
    with pytest.raises(ValueError, match=r"holds 3 2-D datasets.*dataset="):
        as_source(tmp_path / "m.h5")
    with pytest.raises(ValueError, match="no dataset 'zz'"):
        as_source(tmp_path / "m.h5", dataset="zz")
    with pytest.raises(ValueError, match="no dataset 'grp'"):
        as_source(tmp_path / "m.h5", dataset="grp")
    with pytest.raises(TypeError, match="dataset must be a str"):
        as_source(tmp_path / "m.h5", dataset=3)
    with pytest.raises(ValueError, match=r"2-D.*\(103,\)"):
        as_source(tmp_path / "m.h5", dataset="labels")
    src = as_source(tmp_path / "m.h5", 16, dataset="grp/c")
    assert src.shape == (10, D) and "grp/c" in repr(src)
    src.close()
    src.close()
    with h5py.File(tmp_path / "m.h5", "r") as f, pytest.raises(TypeError, match="pass one of its arrays"):
        as_source(f)


def test_zarr_group_selection(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = _data()
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("acts", shape=x.shape, dtype=x.dtype)[:] = x
    g.create_array("ids", shape=(N,), dtype="int64")
    src = as_source(tmp_path / "g.zarr", 32)
    _assert_matches(_collect(src, True), x, 32)
    assert as_source(tmp_path / "g.zarr", dataset="acts").n_rows == N
    with pytest.raises(ValueError, match="no dataset"):
        as_source(tmp_path / "g.zarr", dataset="nope")
    with pytest.raises(ValueError, match="not a group"):
        as_source(tmp_path / "g.zarr" / "acts", dataset="acts")
    with pytest.raises(TypeError, match="pass one of its arrays"):
        as_source(zarr.open_group(str(tmp_path / "g.zarr"), mode="r"))


# -- labels ----------------------------------------------------------------------------------------------------------
def test_load_labels_kinds(tmp_path):
    y = np.arange(12) % 3
    same = load_labels(y, 12)
    assert same is y  # int64 already: no copy
    y32 = y.astype(np.int32)
    got = load_labels(y32, 12)
    assert got.dtype == np.int64 and np.array_equal(got, y)
    t = torch.from_numpy(y)
    assert np.shares_memory(load_labels(t, 12), y)
    np.save(tmp_path / "y.npy", y.astype(np.uint8))
    got = load_labels(tmp_path / "y.npy", 12)
    assert got.dtype == np.int64 and np.array_equal(got, y)
    np.save(tmp_path / "y64.npy", y)
    assert isinstance(load_labels(str(tmp_path / "y64.npy").encode(), 12), np.memmap)
    assert load_labels(np.zeros(0, np.int64), 0).shape == (0,)


@pytest.mark.parametrize(
    ("labels", "exc", "match"),
    [
        (np.arange(5), ValueError, "labels has 5 entries but the source has 6 rows"),
        (np.zeros(6), TypeError, r"integer class ids.*float64.*astype"),
        (np.zeros(6, bool), TypeError, r"integer class ids.*bool"),
        (np.zeros((6, 1), np.int64), ValueError, r"1-D.*\(6, 1\)"),
        (np.array([0, 1, -1, 0, 0, 0]), ValueError, r"non-negative.*-1 at row 2"),
        (np.full(6, 2**63, np.uint64), ValueError, "beyond int64"),
        (torch.zeros(6), TypeError, r"integer class ids.*torch.float32"),
        (torch.zeros(6, dtype=torch.bool), TypeError, r"integer class ids.*torch.bool"),
        ([0, 1, 2, 0, 1, 2], TypeError, r"numpy array, a torch tensor or the path.*list"),
    ],
    ids=["length", "float", "bool", "2d", "negative", "uint64", "torch-float", "torch-bool", "list"],
)
def test_load_labels_errors(labels, exc, match):
    with pytest.raises(exc, match=match):
        load_labels(labels, 6)


# -- shards: writing and the manifest --------------------------------------------------------------------------------
def test_manifest_round_trip(tmp_path):
    x = _data("float32", 100, 3)
    y = np.arange(100) % 4
    src = write_shards(tmp_path / "s", x, rows_per_shard=30, dtype=np.float16, labels=y, chunk_rows=30)
    m = read_manifest(tmp_path / "s")
    assert {k: m[k] for k in ("format", "version", "n_features", "dtype", "n_rows")} == {
        "format": "poisonguard-shards",
        "version": 1,
        "n_features": 3,
        "dtype": "float16",
        "n_rows": 100,
    }
    assert [s["file"] for s in m["shards"]] == [f"shard_{i:05d}.npy" for i in range(4)]
    assert [s["rows"] for s in m["shards"]] == [30, 30, 30, 10]
    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / "s" / s["file"]).read_bytes()).hexdigest()
        assert np.load(tmp_path / "s" / s["file"]).dtype == np.float16  # plain .npy files
    assert m["labels"] == {"file": "labels.npy", "rows": 100}
    assert src.has_labels and np.array_equal(src.labels(), y)
    assert isinstance(src, ShardSource) and src.dtype == np.float16 and len(src.shards) == 4
    verified = ShardSource(tmp_path / "s", verify="sha256", chunk_rows=30)
    _assert_matches(_collect(verified, True), x.astype(np.float16), 30)
    assert not list(tmp_path.glob("s/*.tmp"))


def test_chunks_stop_at_shard_boundaries_with_global_offsets(tmp_path):
    x = _data(n=50)
    src = write_shards(tmp_path / "s", x, rows_per_shard=20, chunk_rows=8)
    got = _collect(src, True)
    assert [(off, len(c)) for c, off in got] == [(0, 8), (8, 8), (16, 4), (20, 8), (28, 8), (36, 4), (40, 8), (48, 2)]
    _assert_matches(got, x, 8, aligned=False)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 60),
    d=st.integers(1, 4),
    rows_per_shard=st.integers(1, 25),
    chunk=st.integers(1, 30),
    parts=st.lists(st.integers(1, 17), min_size=1, max_size=6),
)
def test_shard_offsets_fuzz(n, d, rows_per_shard, chunk, parts):
    x = np.arange(n * d, dtype=np.float64).reshape(n, d)
    bounds = [*np.unique(np.clip(np.cumsum([0, *parts]), 0, n)).tolist(), n]
    blocks = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a] or [x]
    with tempfile.TemporaryDirectory() as tmp:
        src = write_shards(Path(tmp) / "s", blocks, rows_per_shard=rows_per_shard, chunk_rows=chunk)
        assert src.n_rows == n and all(s.rows == rows_per_shard for s in src.shards[:-1])
        for prefetch in (True, False):
            _assert_matches(_collect(src, prefetch), x, chunk, aligned=False)


def test_write_shards_inputs(tmp_path):
    x = _data("float64", 40, 3)
    pairs = [(x[s : s + 7], s) for s in range(0, 40, 7)]
    a = write_shards(tmp_path / "pairs", iter(pairs), rows_per_shard=16)
    assert a.dtype == np.float64 and a.n_rows == 40
    _assert_matches(_collect(a, True), x, 16, aligned=False)
    b = write_shards(tmp_path / "src", as_source(x, 5), rows_per_shard=16, dtype="float32")
    _assert_matches(_collect(b, True), x.astype(np.float32), 16, aligned=False)
    c = write_shards(tmp_path / "torch", torch.from_numpy(x), labels=torch.arange(40) % 2)
    assert c.n_rows == 40 and np.array_equal(c.labels(), np.arange(40) % 2)
    d = write_shards(tmp_path / "gen", (x[s : s + 9] for s in range(0, 40, 9)), labels=np.arange(40))
    assert np.array_equal(d.labels(), np.arange(40))
    np.save(tmp_path / "y.npy", np.arange(40))
    e = write_shards(tmp_path / "genpath", [x[:20], x[20:]], labels=tmp_path / "y.npy")
    assert e.has_labels
    empty = write_shards(tmp_path / "empty", np.zeros((0, 3), np.float32))
    assert (empty.n_rows, empty.n_features, list(empty.chunks()), empty.labels()) == (0, 3, [], None)


def test_write_shards_errors(tmp_path):
    x = _data(n=10)
    with pytest.raises(ValueError, match="no chunks"):
        write_shards(tmp_path / "a", [])
    with pytest.raises(TypeError, match="iterable of"):
        write_shards(tmp_path / "b", "not data")
    with pytest.raises(ValueError, match="labels has 9 entries but the source has 10 rows"):
        write_shards(tmp_path / "c", x, labels=np.arange(9))
    with pytest.raises(ValueError, match="labels has 9 entries but data has more rows"):
        write_shards(tmp_path / "d", [x[:5], x[5:]], labels=np.arange(9))
    assert not (tmp_path / "d" / "manifest.json").exists()  # aborted: no manifest
    with pytest.raises(ValueError, match="labels has 11 entries but the source has 10 rows"):
        write_shards(tmp_path / "e", [x[:5], x[5:]], labels=np.arange(11))
    assert not (tmp_path / "e" / "labels.npy").exists() and not list((tmp_path / "e").glob("*.tmp"))
    with pytest.raises(TypeError, match="float dtype"):
        write_shards(tmp_path / "f", np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        write_shards(tmp_path / "g", [np.zeros(3, np.float32)])


def test_shard_writer_overwrite_rules(tmp_path):
    folder = tmp_path / "s"
    write_shards(folder, _data(n=30), rows_per_shard=10)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite=True"):
        ShardWriter(folder, D, np.float32)
    with ShardWriter(folder, D, np.float32, rows_per_shard=100, overwrite=True) as w:
        w.append(_data(n=5))
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt", "shard_00000.npy"]
    assert ShardSource(folder).n_rows == 5
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        ShardWriter(tmp_path / "file", 3)


def test_shard_writer_appends(tmp_path):
    x = _data("float32", 70, 4)
    with ShardWriter(tmp_path / "s", 4, "float16", rows_per_shard=16) as w:
        w.append(x[:3], labels=np.zeros(3, np.int64))
        w.append(torch.from_numpy(x[3:40]), labels=torch.ones(37, dtype=torch.int64))
        w.append(torch.from_numpy(x[40:]).bfloat16(), labels=np.full(30, 2))
        assert w.n_rows == 70
    src = ShardSource(tmp_path / "s")
    want = x.astype(np.float16).astype(np.float64)
    want[40:] = torch.from_numpy(x[40:]).bfloat16().double().numpy().astype(np.float16)
    _assert_matches(_collect(src, True), want, 16)
    assert np.array_equal(src.labels(), np.r_[np.zeros(3), np.ones(37), np.full(30, 2)])
    assert [s.rows for s in src.shards] == [16, 16, 16, 16, 6]
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.append(x)


def test_shard_writer_append_errors(tmp_path):
    w = ShardWriter(tmp_path / "s", 4, rows_per_shard=8)
    with pytest.raises(ValueError, match="3 features per row but the store has n_features=4"):
        w.append(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="float dtype"):
        w.append(np.zeros((2, 4), np.int16))
    with pytest.raises(TypeError, match="float tensor"):
        w.append(torch.zeros(2, 4, dtype=torch.int16))
    with pytest.raises(TypeError, match="numpy array or a torch CPU tensor"):
        w.append([[0.0] * 4])
    with pytest.raises(ValueError, match="2-D"):
        w.append(torch.zeros(4))
    w.append(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="every append or on none; earlier appends came without"):
        w.append(np.zeros((2, 4), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels has 1 entries but the source has 2 rows"):
        w.append(np.zeros((2, 4), np.float32), labels=np.zeros(1, np.int64))
    w.close()
    w2 = ShardWriter(tmp_path / "t", 4)
    w2.append(np.zeros((1, 4)), labels=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="came with labels"):
        w2.append(np.zeros((1, 4)))
    w2.abort()
    w2.abort()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == []
    with pytest.raises(ValueError, match="rows_per_shard must be >= 1"):
        ShardWriter(tmp_path / "u", 4, rows_per_shard=0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ShardWriter(tmp_path / "v", 4, dtype=np.int8)


def test_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "s", 2, rows_per_shard=4) as w:
        w.append(np.zeros((9, 2)), labels=np.zeros(9, np.int64))
        raise RuntimeError("boom")
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["shard_00000.npy", "shard_00001.npy"]  # full shards stay, unlisted; no manifest, no labels
    with pytest.raises(ValueError, match=r"has no manifest\.json"):
        ShardSource(tmp_path / "s")


def test_bfloat16_shards(tmp_path):
    x = np.random.default_rng(3).standard_normal((37, 6)).astype(np.float32)
    x[0, 0], x[0, 1], x[0, 2] = np.nan, np.inf, -0.0
    x[1] = np.float32(1.00390625)  # exactly half-way between two bfloat16 values: rounds to even
    ref = torch.from_numpy(x).bfloat16()
    from_numpy = write_shards(tmp_path / "a", x, rows_per_shard=10, dtype="bfloat16")
    from_torch = write_shards(tmp_path / "b", ref, rows_per_shard=10)
    for src in (from_numpy, from_torch, ShardSource(tmp_path / "a", chunk_rows=4)):
        assert src.dtype == "bfloat16" and src.dtype_name == "bfloat16"
        chunks = list(src.chunks())
        assert all(c.dtype == torch.bfloat16 for c, _ in chunks)
        got = torch.cat([c for c, _ in chunks])
        ok = ~torch.isnan(ref)
        assert torch.equal(torch.isnan(got), ~ok)  # NaN stays NaN (payload bits may differ from torch's)
        assert torch.equal(got.view(torch.int16)[ok], ref.view(torch.int16)[ok])  # bit-identical rounding
    assert read_manifest(tmp_path / "a")["dtype"] == "bfloat16"
    assert np.load(tmp_path / "a" / "shard_00000.npy").dtype == np.uint16
    f32 = write_shards(tmp_path / "c", ref, dtype=np.float32)
    assert np.array_equal(np.load(tmp_path / "c" / "shard_00000.npy"), ref.float().numpy(), equal_nan=True)
    assert f32.dtype == np.float32


def test_default_rows_per_shard():
    assert default_rows_per_shard(4096, np.float16) == 32768  # 256 MiB
    assert default_rows_per_shard(3, np.float32) == 2**24 - 2**24 % 16384
    assert default_rows_per_shard(2**20, np.float64) == 32  # small: not rounded to 16384
    assert default_rows_per_shard(0, "bfloat16") > 0


# -- shards: verification --------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> Path:
    write_shards(tmp_path / "s", _data("float32", 30, 4), rows_per_shard=10, labels=np.arange(30))
    return tmp_path / "s"


def test_truncated_shard(store):
    p = store / "shard_00001.npy"
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"shard_00001\.npy is truncated: expected 10 rows .*found 6 rows"):
        ShardSource(store)
    src = ShardSource(store, verify="none")  # deferred: raised when the pass reaches the shard
    seen = []
    with pytest.raises(ValueError, match=r"shard_00001\.npy is truncated"):
        for _, off in src.chunks():
            seen.append(off)
    assert seen == [0] and _no_reader_threads()


def test_sha256_mismatch(store):
    p = store / "shard_00002.npy"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    ShardSource(store)  # size still right
    with pytest.raises(ValueError, match=r"shard_00002\.npy fails its SHA-256 check"):
        ShardSource(store, verify="sha256")


def test_missing_and_foreign_shards(store, tmp_path):
    (store / "shard_00000.npy").unlink()
    with pytest.raises(ValueError, match=r"shard_00000\.npy listed in .*manifest\.json is missing"):
        ShardSource(store)
    np.save(store / "shard_00000.npy", np.zeros((10, 4), np.float64))
    with pytest.raises(ValueError, match=r"shard_00000\.npy holds float64; the manifest says float32"):
        ShardSource(store)
    np.save(store / "shard_00000.npy", np.zeros((9, 4), np.float32))
    with pytest.raises(ValueError, match=r"shard_00000\.npy has shape \(9, 4\) but the manifest says \(10, 4\)"):
        ShardSource(store)
    np.save(store / "shard_00000.npy", np.asfortranarray(np.zeros((10, 4), np.float32)))
    with pytest.raises(ValueError, match="Fortran order"):
        ShardSource(store)
    np.save(store / "shard_00000.npy", np.zeros((10, 4), np.float32))
    with open(store / "shard_00000.npy", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match=r"shard_00000\.npy is 8 bytes longer"):
        ShardSource(store)
    (store / "shard_00000.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"shard_00000\.npy is not a valid \.npy file"):
        ShardSource(store)
    np.save(store / "shard_00000.npy", np.zeros((10, 4), np.float32))
    ShardSource(store)
    (store / "labels.npy").unlink()
    with pytest.raises(ValueError, match=r"labels\.npy listed in .* is missing"):
        ShardSource(store).labels()
    with pytest.raises(ValueError, match="verify must be one of"):
        ShardSource(store, verify="md5")
    with pytest.raises(ValueError, match=r"has no manifest\.json"):
        ShardSource(tmp_path)


def _mutations():
    def edit(fn):
        def apply(m):
            fn(m)
            return json.dumps(m)

        return apply

    def set_(key, value):
        return edit(lambda m: m.__setitem__(key, value))

    def shard(key, value):
        return edit(lambda m: m["shards"][0].__setitem__(key, value))

    return {
        "not-json": (lambda m: "{not json", "not valid JSON"),
        "not-object": (lambda m: "[1, 2]", "expected a JSON object"),
        "missing-key": (edit(lambda m: m.pop("n_features")), r"missing keys \['n_features'\]"),
        "format": (set_("format", "other"), "format is 'other'"),
        "version": (set_("version", 2), "version 2 is not supported"),
        "version-bool": (set_("version", True), "version True is not supported"),
        "n_rows": (set_("n_rows", -1), "n_rows must be a non-negative integer"),
        "n_features": (set_("n_features", "4"), "n_features must be a non-negative integer"),
        "dtype": (set_("dtype", "int8"), "dtype must be one of"),
        "shards-type": (set_("shards", {}), "shards must be a list"),
        "shard-keys": (edit(lambda m: m["shards"][0].pop("sha256")), r"shards\[0\] must be an object"),
        "traversal": (shard("file", "../shard_00000.npy"), r"shards\[0\]\.file must be a \.npy file name"),
        "not-npy": (shard("file", "shard.bin"), r"shards\[0\]\.file must be a \.npy file name"),
        "duplicate": (edit(lambda m: m["shards"][1].__setitem__("file", "shard_00000.npy")), "listed twice"),
        "rows": (shard("rows", 1.5), r"shards\[0\]\.rows must be a non-negative integer"),
        "sha": (shard("sha256", "abc"), r"shards\[0\]\.sha256 must be 64 lowercase hex"),
        "total": (set_("n_rows", 31), "n_rows is 31 but the shards hold 30 rows"),
        "labels": (set_("labels", {"file": "labels.npy", "rows": 3}), "labels must be"),
    }


@pytest.mark.parametrize("case", list(_mutations()))
def test_malformed_manifest(case, store):
    mutate, match = _mutations()[case]
    path = store / "manifest.json"
    path.write_text(mutate(json.loads(path.read_text())))
    with pytest.raises(ValueError, match=r"malformed shard manifest .*manifest\.json: .*" + match):
        ShardSource(store)


def test_array_source_path_and_repr(tmp_path):
    np.save(tmp_path / "x.npy", _data())
    src = as_source(tmp_path / "x.npy")
    assert isinstance(src, ArraySource) and src.path == str(tmp_path / "x.npy")
    assert "x.npy" in repr(src) and "ArraySource" in repr(src)


# -- zarr / h5py dispatch without the packages (stand-ins with the same interface) -------------------------------------
class _FakeH5Dataset:
    __module__ = "h5py._hl.dataset"

    def __init__(self, name: str, arr: np.ndarray) -> None:
        self.name, self._a, self.shape, self.dtype = name, arr, arr.shape, arr.dtype

    def read_direct(self, dest, source_sel, dest_sel):
        dest[dest_sel] = self._a[source_sel]


class _FakeH5File:
    __module__ = "h5py._hl.files"
    files: ClassVar[dict] = {}

    def __init__(self, path, mode):
        assert mode == "r"
        self.items = self.files[str(path)]
        self.closed = False

    def visititems(self, fn):
        for name, obj in self.items.items():
            fn(name, obj)

    def __getitem__(self, name):
        return self.items[name]

    def close(self):
        self.closed = True


class _FakeZarrArray:
    __module__ = "zarr.core.array"

    def __init__(self, arr: np.ndarray) -> None:
        self._a, self.shape, self.dtype = arr, arr.shape, arr.dtype

    def get_basic_selection(self, sel, out):
        target = out.arr if hasattr(out, "arr") else out
        target[...] = self._a[sel]


class _FakeZarrGroup:
    __module__ = "zarr.core.group"

    def __init__(self, arrays: dict) -> None:
        self.arrays = arrays

    def array_keys(self):
        return iter(self.arrays)

    def __getitem__(self, name):
        return self.arrays[name]


class _FakeNDBuffer:
    def __init__(self, arr):
        self.arr = arr

    @classmethod
    def from_numpy_array(cls, arr):
        return cls(arr)


@pytest.fixture
def fake_h5py(monkeypatch):
    mod = types.ModuleType("h5py")
    mod.File, mod.Dataset = _FakeH5File, _FakeH5Dataset
    monkeypatch.setitem(sys.modules, "h5py", mod)
    monkeypatch.setattr(_FakeH5File, "files", {})
    return _FakeH5File.files


@pytest.fixture(params=["zarr3", "zarr2"])
def fake_zarr(monkeypatch, request):
    stores: dict = {}
    mod = types.ModuleType("zarr")
    mod.open = lambda path, mode: stores[str(path)]
    monkeypatch.setitem(sys.modules, "zarr", mod)
    if request.param == "zarr3":  # zarr 3 reads into an NDBuffer; zarr 2 into the array itself
        for name in ("zarr.core", "zarr.core.buffer"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        cpu = types.ModuleType("zarr.core.buffer.cpu")
        cpu.NDBuffer = _FakeNDBuffer
        monkeypatch.setitem(sys.modules, "zarr.core.buffer.cpu", cpu)
    else:
        monkeypatch.setitem(sys.modules, "zarr.core", None)
    return stores


def test_hdf5_dispatch_with_a_stand_in(fake_h5py, tmp_path):
    x = _data("float16")
    path = tmp_path / "acts.hdf5"
    path.write_bytes(b"")
    fake_h5py[str(path)] = {"acts": _FakeH5Dataset("/acts", x), "ids": _FakeH5Dataset("/ids", np.arange(N))}
    src = as_source(path, 16)
    assert isinstance(src, StoreSource) and src.kind == "h5py" and "acts" in repr(src)
    _assert_matches(_collect(src, True), x, 16)
    _assert_matches(_collect(as_source(fake_h5py[str(path)]["acts"], 32), False), x, 32)
    owner = src._owner
    src.close()
    assert owner.closed
    fake_h5py[str(path)]["more"] = _FakeH5Dataset("/more", x)
    with pytest.raises(ValueError, match="holds 2 2-D datasets"):
        as_source(path)
    with pytest.raises(ValueError, match="2-D"):
        as_source(path, dataset="ids")


def test_zarr_dispatch_with_a_stand_in(fake_zarr, tmp_path):
    x = _data("float32")
    (tmp_path / "a.zarr").mkdir()
    (tmp_path / "a.zarr" / ".zarray").write_text("{}")
    fake_zarr[str(tmp_path / "a.zarr")] = _FakeZarrArray(x)
    src = as_source(tmp_path / "a.zarr", 16)
    assert src.kind == "zarr"
    _assert_matches(_collect(src, True), x, 16)
    (tmp_path / "g.zarr").mkdir()
    (tmp_path / "g.zarr" / ".zgroup").write_text("{}")
    fake_zarr[str(tmp_path / "g.zarr")] = _FakeZarrGroup({"acts": _FakeZarrArray(x)})
    _assert_matches(_collect(as_source(tmp_path / "g.zarr", 50, dataset="acts"), False), x, 50)
    with pytest.raises(ValueError, match="not a group"):
        as_source(tmp_path / "a.zarr", dataset="acts")
    with pytest.raises(TypeError, match="pass one of its arrays"):
        as_source(fake_zarr[str(tmp_path / "g.zarr")])


# -- odds and ends ---------------------------------------------------------------------------------------------------
def test_host_memory_only():
    meta = torch.zeros(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"is on meta.*CPU tensor"):
        as_source(meta)
    with pytest.raises(ValueError, match="labels are on meta"):
        load_labels(torch.zeros(4, dtype=torch.int64, device="meta"), 4)


def test_shard_writer_refuses_device_tensors(tmp_path):
    with ShardWriter(tmp_path / "s", 3) as w, pytest.raises(ValueError, match="is on meta"):
        w.append(torch.zeros(2, 3, device="meta"))


def test_page_releaser_edge_cases(tmp_path):
    from poisonguard.sources.arrays import _PageReleaser

    in_memory = _PageReleaser(np.zeros((4, 4)))
    in_memory.prefault(np.zeros((4, 4)))  # nothing mapped: no-op
    in_memory.release(np.zeros((4, 4)))
    np.save(tmp_path / "x.npy", np.zeros((4, 4)))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    pages = _PageReleaser(mapped)
    pages.prefault(mapped[:0])
    pages.prefault(mapped[:, :0])
    pages.release(mapped[:0])


def test_npy_header_versions_and_empty_shards(store):
    from poisonguard.sources.shards import _sha256_of

    x = np.load(store / "shard_00001.npy")
    with open(store / "shard_00001.npy", "wb") as f:
        np.lib.format.write_array(f, x, version=(2, 0))
    m = json.loads((store / "manifest.json").read_text())
    m["shards"][1]["sha256"] = _sha256_of(store / "shard_00001.npy")
    np.save(store / "shard_empty.npy", np.zeros((0, 4), np.float32))
    m["shards"].insert(1, {"file": "shard_empty.npy", "rows": 0, "sha256": _sha256_of(store / "shard_empty.npy")})
    (store / "manifest.json").write_text(json.dumps(m))
    src = ShardSource(store, verify="sha256", chunk_rows=10)
    assert [s.offset for s in src.shards] == [0, 10, 10, 20]
    _assert_matches(_collect(src, True), _data("float32", 30, 4), 10)
    with open(store / "shard_00001.npy", "wb") as f:
        np.lib.format.write_array(f, x, version=(3, 0))
    with pytest.raises(ValueError, match=r"shard_00001\.npy is not a valid \.npy file: unsupported \.npy version"):
        ShardSource(store)
