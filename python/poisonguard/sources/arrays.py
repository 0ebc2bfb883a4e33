"""Row chunks of in-memory arrays, torch tensors, memory-mapped ``.npy`` files and zarr / HDF5 datasets, with bounded
resident memory; and class labels loaded to match a source."""

from __future__ import annotations

import importlib
import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._interop import describe, is_torch_tensor
from ..ops.covariance import _as_int
from .base import ChunkItem, Source, check_matrix_shape, dtype_name

_NUMPY_FLOATS = ("float16", "float32", "float64")


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """Memory-maps a ``.npy`` file read-only. Never unpickles: object arrays are refused with ``ValueError``."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)} is not a plain numeric .npy file: {exc}") from None
    return arr


def _mmap_of(x: np.ndarray) -> mmap.mmap | None:
    base = x
    while base is not None:
        mm = getattr(base, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        base = getattr(base, "base", None)  # numpy views of torch tensors end in a Tensor (no .base)
    return None


class _PageReleaser:
    """Drops the pages of a read-only file mapping once a chunk is done, so a pass over a file larger than memory
    keeps resident memory at about one chunk (the pages stay in the OS page cache, just not in this process).
    :meth:`prefault` does the opposite ahead of time: it pulls a chunk's pages in on the read-ahead thread, so the
    consumer does not stall on page faults."""

    def __init__(self, x: np.ndarray) -> None:
        self.mm = _mmap_of(x)
        self.ok = self.mm is not None and hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
        if self.mm is not None:
            self.bytes = np.frombuffer(self.mm, dtype=np.uint8)
            self.base = self.bytes.ctypes.data
            self.size = len(self.mm)

    def _span(self, chunk: np.ndarray) -> tuple[int, int]:
        """Byte range ``[lo, hi)`` of the mapping under ``chunk``, ``lo`` rounded down to a page."""
        start = chunk.ctypes.data - self.base
        lo = start + min(0, chunk.strides[0] * (chunk.shape[0] - 1))
        hi = start + max(0, chunk.strides[0] * (chunk.shape[0] - 1)) + chunk.strides[-1] * chunk.shape[-1]
        lo = max(0, lo - lo % mmap.PAGESIZE)
        return lo, min(self.size, hi)

    def release(self, chunk: np.ndarray) -> None:
        if not self.ok or chunk.size == 0:
            return
        lo, hi = self._span(chunk)
        if hi < self.size:
            hi -= hi % mmap.PAGESIZE  # a page shared with the next chunk stays; that chunk's release drops it
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def prefault(self, chunk: np.ndarray) -> None:
        if self.mm is None or chunk.size == 0:
            return
        lo, hi = self._span(chunk)
        if hi <= lo:
            return
        if hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            self.mm.madvise(mmap.MADV_WILLNEED, lo, hi - lo)
        # One byte per page: the reduction faults every page in (without the GIL) on this thread.
        self.bytes[lo : hi : mmap.PAGESIZE].max()


def iter_row_chunks(x: Any, chunk_rows: int = 16384) -> Iterator[tuple[Any, int]]:
    """Yields ``(x[s:s + chunk_rows], s)`` views (no copies) over the first axis of ``x``.

    For a memory-mapped array (``np.load(..., mmap_mode="r")`` or :func:`open_npy`) the pages of each chunk are
    released after the consumer moves on, so resident memory stays near one chunk whatever the file size.
    """
    chunk_rows = _as_int(chunk_rows, "chunk_rows", 1)
    n = x.shape[0]
    releaser = _PageReleaser(x) if isinstance(x, np.ndarray) else None
    for s in range(0, n, chunk_rows):
        chunk = x[s : s + chunk_rows]
        yield chunk, s
        if releaser is not None:
            releaser.release(chunk)


def _check_numpy_float(dt: np.dtype, what: str) -> np.dtype:
    dt = np.dtype(dt)
    if dt.kind != "f" or dt.name not in _NUMPY_FLOATS:
        raise TypeError(
            f"{what} must have a float dtype (float16, float32 or float64), got {dt}; "
            "convert it explicitly (e.g. x.astype(np.float32))"
        )
    return dt


class ArraySource(Source):
    """Chunks of a 2-D numpy array, memory maps included: views, no copies.

    For a memory map the read-ahead thread faults the next chunk's pages in while the consumer works, and a chunk's
    pages are dropped from this process once the consumer is done with it, so resident memory stays at about two
    chunks whatever the file size. ``path`` is the file the array was mapped from (``None`` for in-memory arrays).
    """

    def __init__(self, x: np.ndarray, chunk_rows: int = 16384, *, path: str | os.PathLike | None = None) -> None:
        what = os.fspath(path) if path is not None else "x"
        n, d = check_matrix_shape(x.shape, what)
        dt = _check_numpy_float(x.dtype, what)
        if not dt.isnative:
            raise TypeError(f"{what} has non-native byte order ({dt}); use x.astype(x.dtype.newbyteorder('='))")
        super().__init__(n, d, dt, chunk_rows)
        self.array = x
        self.path = None if path is None else os.fspath(path)

    def _repr_extra(self) -> str:
        return f", path={self.path!r}" if self.path else ""

    def _read(self, depth: int) -> Iterator[ChunkItem]:
        x = self.array
        pages = _PageReleaser(x)
        mapped = pages.mm is not None
        for s in range(0, self.n_rows, self.chunk_rows):
            chunk = x[s : s + self.chunk_rows]
            if mapped and depth > 1:
                pages.prefault(chunk)
            yield chunk, s, (lambda c=chunk, p=pages: p.release(c)) if mapped else None


class TensorSource(Source):
    """Chunks of a 2-D torch CPU tensor (float16, bfloat16, float32, float64): detached views, no copies.
    :attr:`dtype` is the torch dtype's name, e.g. ``"bfloat16"``."""

    def __init__(self, x: Any, chunk_rows: int = 16384) -> None:
        import torch

        if x.device.type != "cpu":
            raise ValueError(f"x is on {x.device}; sources read host memory: pass a CPU tensor (x.cpu())")
        if x.layout != torch.strided:
            raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}; use x.to_dense()")
        n, d = check_matrix_shape(tuple(x.shape), "x")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
        name = dtype_name(x.dtype)
        super().__init__(n, d, name, chunk_rows)
        self.tensor = x.detach()

    def _read(self, depth: int) -> Iterator[ChunkItem]:
        t = self.tensor
        for s in range(0, self.n_rows, self.chunk_rows):
            yield t[s : s + self.chunk_rows], s, None


def import_optional(module: str, pip_name: str, what: str) -> Any:
    """Imports an optional dependency, or raises ImportError naming the pip package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the optional package '{pip_name}', which is not installed: pip install {pip_name}"
        ) from exc


def store_kind(obj: Any) -> str | None:
    """``"zarr"`` or ``"h5py"`` when ``obj`` comes from one of those packages (looked up without importing them)."""
    root = type(obj).__module__.partition(".")[0]
    return root if root in ("zarr", "h5py") else None


class StoreSource(Source):
    """Chunks of a 2-D zarr array or h5py dataset (float16, float32, float64).

    Such datasets live compressed or on disk, so here a copy is unavoidable: each chunk is read into a reusable
    buffer (h5py ``read_direct``, zarr ``get_basic_selection(out=...)``; nothing else is allocated per chunk). One
    buffer without read-ahead, two with it; a chunk is valid until the next one is requested, copy it to keep it.
    Chunk rows follow :attr:`chunk_rows`; pick a multiple of the dataset's own chunking along rows to read each
    stored chunk once. ``owner`` is a file this source opened itself and closes in :meth:`close`.
    """

    def __init__(self, data: Any, chunk_rows: int = 16384, *, owner: Any = None, name: str = "") -> None:
        kind = store_kind(data)
        self.name = name or getattr(data, "name", None) or type(data).__name__
        n, d = check_matrix_shape(tuple(data.shape), f"dataset {self.name}")
        dt = _check_numpy_float(data.dtype, f"dataset {self.name}")
        super().__init__(n, d, dt.newbyteorder("="), chunk_rows)
        self.data = data
        self.kind = kind
        self._owner = owner
        self._fill = self._reader_for(kind, data)

    def _repr_extra(self) -> str:
        return f", kind={self.kind!r}, name={self.name!r}"

    @staticmethod
    def _reader_for(kind: str | None, data: Any):
        if kind == "h5py":

            def fill(out: np.ndarray, s: int, e: int) -> None:
                data.read_direct(out, source_sel=np.s_[s:e], dest_sel=np.s_[0 : e - s])

            return fill
        if kind == "zarr":
            try:  # zarr 3 takes an NDBuffer wrapping our array; zarr 2 takes the array itself
                from zarr.core.buffer.cpu import NDBuffer
            except ImportError:  # zarr 2

                def fill(out: np.ndarray, s: int, e: int) -> None:
                    data.get_basic_selection(np.s_[s:e], out=out[: e - s])

                return fill

            def fill(out: np.ndarray, s: int, e: int) -> None:
                data.get_basic_selection(np.s_[s:e], out=NDBuffer.from_numpy_array(out[: e - s]))

            return fill

        def fill(out: np.ndarray, s: int, e: int) -> None:  # any array-like with row slicing (one temporary)
            out[: e - s] = data[s:e]

        return fill

    def _read(self, depth: int) -> Iterator[ChunkItem]:
        rows = min(self.chunk_rows, self.n_rows)
        buffers: list[np.ndarray] = []
        for i, s in enumerate(range(0, self.n_rows, self.chunk_rows)):
            if len(buffers) < depth:
                buffers.append(np.empty((rows, self.n_features), dtype=self.dtype))
            out = buffers[i % depth]
            e = min(s + self.chunk_rows, self.n_rows)
            self._fill(out, s, e)
            yield out[: e - s], s, None

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()
            self._owner = None


def _pick_dataset(names: list[str], dataset: str | None, path: str, get) -> Any:
    if dataset is not None:
        if not isinstance(dataset, str):
            raise TypeError(f"dataset must be a str naming an array in {path}, got {type(dataset).__name__}")
        try:
            return get(dataset)
        except KeyError:
            raise ValueError(f"{path} has no dataset {dataset!r}; it has {names[:10]}") from None
    candidates = [n for n in names if len(get(n).shape) == 2]
    if len(candidates) != 1:
        raise ValueError(f"{path} holds {len(candidates)} 2-D datasets {candidates[:10]}; choose one with dataset=")
    return get(candidates[0])


def open_hdf5(path: str | os.PathLike, dataset: str | None = None, chunk_rows: int = 16384) -> StoreSource:
    """A :class:`StoreSource` over a dataset of an HDF5 file (needs ``h5py``). With ``dataset=None`` the file must
    hold exactly one 2-D dataset. The file is opened read-only and closed by :meth:`StoreSource.close`."""
    h5py = import_optional("h5py", "h5py", "reading HDF5 files")
    p = os.fspath(path)
    f = h5py.File(p, "r")
    try:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)

        def get(name: str) -> Any:
            obj = f[name]
            if not isinstance(obj, h5py.Dataset):
                raise KeyError(name)
            return obj

        ds = _pick_dataset(names, dataset, p, get)
        return StoreSource(ds, chunk_rows, owner=f, name=f"{p}:{ds.name}")
    except BaseException:
        f.close()
        raise


def open_zarr(path: str | os.PathLike, dataset: str | None = None, chunk_rows: int = 16384) -> StoreSource:
    """A :class:`StoreSource` over a zarr array stored at ``path`` (needs ``zarr``), or over the array ``dataset``
    of the zarr group there (with ``dataset=None`` the group must hold exactly one 2-D array). Opened read-only."""
    zarr = import_optional("zarr", "zarr", "reading zarr stores")
    p = os.fspath(path)
    node = zarr.open(p, mode="r")
    if hasattr(node, "array_keys"):  # a group
        names = sorted(node.array_keys())
        node = _pick_dataset(names, dataset, p, lambda name: node[name])
    elif dataset is not None:
        raise ValueError(f"{p} is a zarr array, not a group; drop dataset={dataset!r}")
    return StoreSource(node, chunk_rows, name=p if dataset is None else f"{p}:{dataset}")


def load_labels(labels: Any, n_rows: int) -> np.ndarray:
    """Class labels for the ``n_rows`` rows of a source, as a 1-D int64 numpy array ``[n_rows]``.

    ``labels`` is a numpy array, a torch CPU tensor or the path of a ``.npy`` file (memory-mapped, never unpickled).
    Labels must have an integer dtype: floats (even integral ones) and bools are refused with TypeError, so a
    mixed-up features file is caught rather than rounded. int64 input is returned as is (a view, a memory map for a
    file); other integer dtypes are converted (one copy of ``n_rows`` int64). ValueError when ``labels`` is not 1-D
    or has a length other than ``n_rows``, or holds a negative id (one read over the labels checks their range).
    """
    n_rows = _as_int(n_rows, "n_rows", 0)
    if isinstance(labels, bytes):
        labels = os.fsdecode(labels)
    if isinstance(labels, (str, os.PathLike)):
        arr = open_npy(labels)
    elif is_torch_tensor(labels):
        if labels.device.type != "cpu":
            raise ValueError(f"labels are on {labels.device}; pass a CPU tensor (labels.cpu())")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or str(labels.dtype) == "torch.bool":
            raise TypeError(f"labels must hold integer class ids, got {labels.dtype}; convert with labels.long()")
        arr = labels.detach().numpy()
    elif isinstance(labels, np.ndarray):
        arr = labels
    else:
        raise TypeError(
            f"labels must be a numpy array, a torch tensor or the path of a .npy file, got {describe(labels)}; "
            "wrap sequences with np.asarray(labels, dtype=np.int64)"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"labels must hold integer class ids, got dtype {arr.dtype}; convert explicitly "
            "(e.g. labels.astype(np.int64)) if the values are whole numbers"
        )
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D [n_rows], got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"labels has {arr.shape[0]} entries but the source has {n_rows} rows")
    if n_rows:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            i = int(np.argmax(arr < 0))
            raise ValueError(f"labels must be non-negative class ids; found {arr[i]} at row {i}")
        if hi > np.iinfo(np.int64).max:
            raise ValueError(f"labels hold ids up to {hi}, beyond int64")
    if arr.dtype == np.int64 and arr.dtype.isnative:
        return arr
    return arr.astype(np.int64)
