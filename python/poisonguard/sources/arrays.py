"""Row chunks of in-memory arrays and memory-mapped ``.npy`` files, with bounded resident memory."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..ops.covariance import _as_int


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
    keeps resident memory at about one chunk (the pages stay in the OS page cache, just not in this process)."""

    def __init__(self, x: np.ndarray) -> None:
        self.mm = _mmap_of(x)
        self.ok = self.mm is not None and hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
        if self.ok:
            self.base = np.frombuffer(self.mm, dtype=np.uint8).ctypes.data
            self.size = len(self.mm)

    def release(self, chunk: np.ndarray) -> None:
        if not self.ok or chunk.size == 0:
            return
        start = chunk.ctypes.data - self.base
        lo = start + min(0, chunk.strides[0] * (chunk.shape[0] - 1))
        hi = start + max(0, chunk.strides[0] * (chunk.shape[0] - 1)) + chunk.strides[-1] * chunk.shape[-1]
        lo = max(0, lo - lo % mmap.PAGESIZE)
        hi = min(self.size, hi)
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


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
