"""Chunked readers over row-major data. This module holds the array / ``.npy`` readers used by the ops; the
source interface for scans (shards, zarr, HDF5, dask, capture) builds on them."""

from .arrays import iter_row_chunks, open_npy

__all__ = ["iter_row_chunks", "open_npy"]
