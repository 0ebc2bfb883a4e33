"""The source interface of a scan: row chunks of an ``[n_rows, n_features]`` float matrix, read ahead on a thread.

A :class:`Source` knows its shape and dtype and yields ``(x, row_offset)`` chunks in row order. Concrete sources
(arrays, tensors, ``.npy`` files, shard folders, zarr / HDF5 datasets) only implement :meth:`Source._read`; the
read-ahead thread, its hand-off and its shutdown live here, once.
"""

from __future__ import annotations

import queue
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Union

import numpy as np

from ..ops.covariance import _as_int

# Float dtypes a source may hold. numpy has no bfloat16: bfloat16 data lives in torch tensors (or, on disk, as the
# raw uint16 bit patterns of a shard).
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")

DtypeLike = Union[np.dtype, str, type, Any]

#: One chunk as a reader produces it: the rows, their offset, and a callback run once the consumer is done with the
#: rows (releasing memory-mapped pages, handing a buffer back), or ``None``.
ChunkItem = tuple[Any, int, Union[Callable[[], None], None]]


def dtype_name(dtype: DtypeLike) -> str:
    """The name (``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``) of a float dtype given as a numpy
    dtype, a numpy scalar type, a string or a torch dtype. Raises TypeError for anything else (integer, complex,
    float128 ...)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str) and dtype in FLOAT_DTYPE_NAMES:
        name = dtype
    else:
        try:
            npd = np.dtype(dtype)
        except TypeError:
            raise TypeError(
                f"dtype must be one of {', '.join(FLOAT_DTYPE_NAMES)} (numpy, torch or a name), got {dtype!r}"
            ) from None
        name = npd.name if npd.kind == "f" else f"{npd} (kind {npd.kind!r})"
    if name not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {', '.join(FLOAT_DTYPE_NAMES)}, got {name}")
    return name


def check_matrix_shape(shape: tuple, what: str) -> tuple[int, int]:
    """``(n_rows, n_features)`` of a 2-D shape; ValueError naming the shape otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        hint = " (flatten feature maps first: x.reshape(len(x), -1))" if len(shape) > 2 else ""
        raise ValueError(f"{what} must be 2-D [n_rows, n_features], got shape {shape}{hint}")
    return shape[0], shape[1]


class Source(ABC):
    """Row chunks of an ``[n_rows, n_features]`` float matrix, in row order.

    Attributes
    ----------
    n_rows, n_features : int
        The shape; ``len(source) == n_rows``.
    dtype : numpy.dtype or str
        The dtype of the chunks: a numpy dtype when chunks are numpy arrays, the torch dtype's name (``"bfloat16"``,
        ``"float32"`` ...) when chunks are torch CPU tensors. :attr:`dtype_name` is always the name.
    chunk_rows : int
        Rows per chunk. Chunks hold at most this many rows; a source made of several files (shards) yields a
        smaller chunk at the end of each file rather than copying rows across files.

    Iterate with :meth:`chunks`. A source may be iterated any number of times, also by several consumers at once;
    each :meth:`chunks` call has its own reader. Sources that own files (an HDF5 file opened from a path) are
    closed with :meth:`close` or a ``with`` block.
    """

    def __init__(self, n_rows: int, n_features: int, dtype: np.dtype | str, chunk_rows: int) -> None:
        self._n_rows = _as_int(n_rows, "n_rows", 0)
        self._n_features = _as_int(n_features, "n_features", 0)
        self._dtype = dtype
        self._chunk_rows = _as_int(chunk_rows, "chunk_rows", 1)

    # -- shape -------------------------------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def n_features(self) -> int:
        return self._n_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n_rows, self._n_features)

    @property
    def dtype(self) -> np.dtype | str:
        return self._dtype

    @property
    def dtype_name(self) -> str:
        return self._dtype if isinstance(self._dtype, str) else np.dtype(self._dtype).name

    @property
    def chunk_rows(self) -> int:
        return self._chunk_rows

    def __len__(self) -> int:
        return self._n_rows

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_rows={self._n_rows}, n_features={self._n_features}, "
            f"dtype={self.dtype_name}, chunk_rows={self._chunk_rows}{self._repr_extra()})"
        )

    def _repr_extra(self) -> str:
        return ""

    # -- reading -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, depth: int) -> Iterator[ChunkItem]:
        """Yields ``(x, row_offset, done)`` in row order. At most ``depth`` chunks are alive at once (the consumer's
        and, with read-ahead, the next one): ``done`` of chunk ``k`` is called before chunk ``k + depth`` is read, so
        a reader may cycle through ``depth`` reusable buffers."""

    def chunks(self, prefetch: bool = True) -> Iterator[tuple[Any, int]]:
        """Yields ``(x, row_offset)``: ``x`` is ``[rows, n_features]`` (at most :attr:`chunk_rows` rows) of
        :attr:`dtype`, ``row_offset`` the index of its first row. Order is deterministic (row order).

        Chunks are views (no copy) of in-memory arrays, tensors and memory-mapped files; zarr and HDF5 datasets are
        read into reusable buffers, so there a chunk is valid until the next one is requested (copy it to keep it).

        With ``prefetch`` the next chunk is read on a background thread while the caller works on the current one
        (at most one chunk waits); an exception in the reader is raised here, in the caller; stopping early (leaving
        the loop, ``close()`` on this generator) stops and joins the thread.
        """
        if prefetch:
            return _read_ahead(self._read(2))
        return _read_inline(self._read(1))

    # -- lifetime ----------------------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Releases files this source opened itself (none for most sources)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_inline(items: Iterator[ChunkItem]) -> Iterator[tuple[Any, int]]:
    try:
        for x, offset, done in items:
            yield x, offset
            if done is not None:
                done()
    finally:
        items.close()  # type: ignore[attr-defined]


_END = object()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _read_ahead(items: Iterator[ChunkItem]) -> Iterator[tuple[Any, int]]:
    """Runs ``items`` on a daemon thread, one chunk ahead of the consumer.

    Two slots gate the reader: it takes one before reading a chunk, the consumer gives one back when it is done
    with a chunk. So at most two chunks are alive (the consumer's and the next), at most one waits in the queue,
    and a chunk's ``done`` runs (on the consumer's thread) before the chunk two places later is read.
    """
    slots = threading.Semaphore(2)
    handoff: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def reader() -> None:
        try:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                try:
                    item = next(items)
                except StopIteration:
                    handoff.put(_END)
                    return
                handoff.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            handoff.put(_Failure(exc))
        finally:
            items.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=reader, name="poisonguard-source-reader", daemon=True)
    return _consume(thread, handoff, slots, stop)


def _consume(
    thread: threading.Thread, handoff: queue.SimpleQueue, slots: threading.Semaphore, stop: threading.Event
) -> Iterator[tuple[Any, int]]:
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            x, offset, done = item
            yield x, offset
            if done is not None:
                done()
            slots.release()
    finally:
        stop.set()
        slots.release()  # wakes a reader waiting for a slot; it sees `stop` and returns
        thread.join()
