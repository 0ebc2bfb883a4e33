"""Chunked readers over row-major data, and the writers that make activation stores.

:func:`as_source` turns whatever holds the activations (a numpy array or memory map, a torch CPU tensor, a ``.npy``
file, a shard folder, a zarr array or an HDF5 dataset) into a :class:`Source`: ``n_rows``, ``n_features``, ``dtype``
and ``chunks()``, which yields ``(x [n, d], row_offset)`` with the next chunk read ahead on a thread.
:func:`capture_activations` and :func:`write_shards` / :class:`ShardWriter` write shard folders;
:func:`load_labels` reads class labels to match a source. The low-level :func:`iter_row_chunks` and
:func:`open_npy` are used by the ops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .._interop import describe, is_torch_tensor
from .arrays import (
    ArraySource,
    StoreSource,
    TensorSource,
    iter_row_chunks,
    load_labels,
    open_hdf5,
    open_npy,
    open_zarr,
    store_kind,
)
from .base import Source
from .capture import capture_activations
from .shards import MANIFEST, ShardSource, ShardWriter, read_manifest, write_shards

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_ACCEPTED = (
    "a 2-D numpy array (memory maps included), a torch CPU tensor, a zarr array, an h5py dataset, a Source, or the "
    "path of a .npy file, a shard folder, a zarr store or an HDF5 file"
)


def as_source(obj: Any, chunk_rows: int = 16384, *, dataset: str | None = None, verify: str = "size") -> Source:
    """A :class:`Source` over ``obj``, read in chunks of ``chunk_rows`` rows.

    ``obj`` may be:

    * a 2-D float numpy array, memory maps included (:class:`ArraySource`: views, mapped pages released after each
      chunk);
    * a 2-D torch CPU tensor of float16, bfloat16, float32 or float64 (:class:`TensorSource`: views);
    * a zarr array or an h5py dataset (:class:`StoreSource`: read into reusable buffers, the one unavoidable copy);
    * a path (``str`` / ``os.PathLike``) to a ``.npy`` file (memory-mapped, never unpickled), a shard folder
      (:class:`ShardSource`, checked with ``verify``), a zarr store, or an HDF5 file (``.h5``, ``.hdf5``); for a
      zarr group or an HDF5 file with several 2-D datasets, ``dataset`` names the one to read;
    * a :class:`Source`, returned as it is.

    zarr and HDF5 need the optional packages ``zarr`` / ``h5py`` (ImportError naming them otherwise). Errors:
    TypeError for anything else and for non-float dtypes, ValueError for a shape that is not 2-D (or a path of an
    unknown kind), FileNotFoundError for a path that does not exist. Sources opened from an HDF5 path own the file:
    close them (``close()`` or ``with``).
    """
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, np.ndarray):
        return ArraySource(obj, chunk_rows)
    if is_torch_tensor(obj):
        return TensorSource(obj, chunk_rows)
    kind = store_kind(obj)
    if kind is not None:
        if not hasattr(obj, "shape") or not hasattr(obj, "dtype"):
            raise TypeError(
                f"got a {kind} {type(obj).__name__}; pass one of its arrays (e.g. f['activations']) or the path with "
                "dataset="
            )
        return StoreSource(obj, chunk_rows)
    if isinstance(obj, bytes):
        obj = os.fsdecode(obj)
    if isinstance(obj, (str, os.PathLike)):
        return _open_path(Path(obj), chunk_rows, dataset, verify)
    raise TypeError(f"cannot read rows from {describe(obj)}; as_source accepts {_ACCEPTED}")


def _open_path(path: Path, chunk_rows: int, dataset: str | None, verify: str) -> Source:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            _no_dataset(dataset, path)
            return ShardSource(path, verify=verify, chunk_rows=chunk_rows)
        if any((path / m).exists() for m in _ZARR_MARKERS):
            return open_zarr(path, dataset, chunk_rows)
        raise ValueError(
            f"{path} is a folder but neither a shard folder (no {MANIFEST}) nor a zarr store; as_source accepts "
            f"{_ACCEPTED}"
        )
    suffix = path.suffix.lower()
    if suffix == ".npy":
        _no_dataset(dataset, path)
        return ArraySource(open_npy(path), chunk_rows, path=path)
    if suffix in _HDF5_SUFFIXES:
        return open_hdf5(path, dataset, chunk_rows)
    raise ValueError(
        f"cannot tell the format of {path} from its suffix {suffix!r}: expected .npy, {', '.join(_HDF5_SUFFIXES)}, a "
        "shard folder or a zarr store"
    )


def _no_dataset(dataset: str | None, path: Path) -> None:
    if dataset is not None:
        raise ValueError(f"dataset={dataset!r} applies to HDF5 files and zarr groups, not to {path}")


__all__ = [
    "ArraySource",
    "ShardSource",
    "ShardWriter",
    "Source",
    "StoreSource",
    "TensorSource",
    "as_source",
    "capture_activations",
    "iter_row_chunks",
    "load_labels",
    "open_hdf5",
    "open_npy",
    "open_zarr",
    "read_manifest",
    "write_shards",
]
