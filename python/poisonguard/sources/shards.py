"""Shard folders: an activation store as numbered ``.npy`` files plus a JSON manifest.

Layout of a folder::

    manifest.json      {"format": "poisonguard-shards", "version": 1, "n_features": d, "dtype": "float16",
                        "n_rows": N, "shards": [{"file": "shard_00000.npy", "rows": r0, "sha256": "..."}, ...],
                        "labels": {"file": "labels.npy", "rows": N}}        <- "labels" only when labels were written
    shard_00000.npy    [r0, d] C-ordered rows 0 .. r0-1
    shard_00001.npy    [r1, d] the next rows ...
    labels.npy         [N] int64 class ids (optional)

Shards are plain ``.npy`` files (readable with ``np.load(..., mmap_mode="r")``); ``bfloat16`` shards hold the raw
bit patterns as ``uint16`` and are read back as torch bfloat16 tensors. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._interop import describe, is_torch_tensor
from ..ops.covariance import _as_int
from .arrays import ArraySource, TensorSource, _PageReleaser, load_labels, open_npy
from .base import FLOAT_DTYPE_NAMES, ChunkItem, DtypeLike, Source, check_matrix_shape, dtype_name

MANIFEST = "manifest.json"
FORMAT = "poisonguard-shards"
VERSION = 1
LABELS_FILE = "labels.npy"
VERIFY_MODES = ("size", "sha256", "none")
_REQUIRED_KEYS = ("format", "version", "n_features", "dtype", "n_rows", "shards")
_OUR_FILES = re.compile(r"^(manifest\.json|labels\.npy|shard_\d{5,}\.npy)(\.tmp)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD_BYTES = 256 * 2**20  # default shard size: large enough for few files, small enough to write in one go
_CHUNK_ROWS = 16384


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype a shard of float dtype ``name`` is stored as (``uint16`` bit patterns for bfloat16)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def default_rows_per_shard(n_features: int, dtype: DtypeLike) -> int:
    """Rows per shard of about 256 MiB, a multiple of 16384 (the default chunk) when it is that large."""
    row_bytes = max(1, n_features * storage_dtype(dtype_name(dtype)).itemsize)
    rows = max(1, min(2**24, _SHARD_BYTES // row_bytes))
    return rows - rows % _CHUNK_ROWS if rows >= _CHUNK_ROWS else rows


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float input, rounded to nearest even like torch (NaN stays NaN).
    One temporary float32 copy of ``x``."""
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    bits = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    bits[np.isnan(f)] = 0x7FC0
    return bits


def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _write_npy(path: Path, arr: np.ndarray) -> str:
    """Writes a C-contiguous array as ``.npy`` (through a temporary file, then renamed) and returns the SHA-256 of
    the file, computed while writing."""
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for part in (_npy_header(arr.shape, arr.dtype), arr.reshape(-1).view(np.uint8)):
            digest.update(part)
            f.write(part)
    os.replace(tmp, path)
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    block = bytearray(8 * 2**20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(block)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


class _LabelsWriter:
    """Streams int64 labels into ``labels.npy`` without holding them: the header is written first with a provisional
    length and rewritten in place on :meth:`finish` (numpy pads headers so the row count can grow in place)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.rows = 0
        self._header_len = len(_npy_header((0,), np.dtype("<i8")))
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish()/abort()
        self._f.write(_npy_header((0,), np.dtype("<i8")))

    def append(self, y: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(y, dtype="<i8"))
        self.rows += len(y)

    def finish(self) -> None:
        header = _npy_header((self.rows,), np.dtype("<i8"))
        if len(header) != self._header_len:  # pragma: no cover - only past 10**21 rows
            raise RuntimeError("labels.npy header grew; cannot update it in place")
        self._f.seek(0)
        self._f.write(header)
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if folder.exists():
        entries = sorted(p.name for p in folder.iterdir())
        if entries and not overwrite:
            raise FileExistsError(
                f"{folder} is not empty ({len(entries)} entries, e.g. {entries[:3]}); pass overwrite=True to replace "
                "the shard store there"
            )
        # Only what a shard store consists of is removed; anything else in the folder is left alone.
        for name in entries:
            if _OUR_FILES.match(name) and (folder / name).is_file():
                (folder / name).unlink()
    folder.mkdir(parents=True, exist_ok=True)


class ShardWriter:
    """Writes rows into a shard folder, one shard at a time.

    ``append`` copies rows into a buffer of one shard (``[rows_per_shard, n_features]`` of the storage dtype, the
    only rows held) and writes the shard when it is full; :meth:`close` writes the last, partial shard and the
    manifest. Used as a context manager, an exception inside the block aborts instead: no manifest is written, so
    the half-written folder is never mistaken for a store.

    Parameters
    ----------
    folder : path
        Created if needed. An existing non-empty folder is refused (FileExistsError) unless ``overwrite=True``,
        which removes a previous store's files (``manifest.json``, ``shard_*.npy``, ``labels.npy``) and nothing else.
    n_features : int
        Row length ``d``.
    dtype : float16 (default), bfloat16, float32 or float64
        Storage dtype (numpy, torch or a name). Rows are cast to it on append (float64 → float16 overflows to inf
        beyond ±65504, with numpy's overflow warning).
    rows_per_shard : int, optional
        Default: about 256 MiB per shard (:func:`default_rows_per_shard`).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        n_features: int,
        dtype: DtypeLike = np.float16,
        rows_per_shard: int | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.n_features = _as_int(n_features, "n_features", 0)
        self.dtype = dtype_name(dtype)
        self._storage = storage_dtype(self.dtype)
        if rows_per_shard is None:
            rows_per_shard = default_rows_per_shard(self.n_features, self.dtype)
        self.rows_per_shard = _as_int(rows_per_shard, "rows_per_shard", 1)
        _prepare_folder(self.folder, overwrite)
        self._buf: np.ndarray | None = None
        self._fill = 0
        self._n_rows = 0
        self._shards: list[dict] = []
        self._labels: _LabelsWriter | None = None
        self._with_labels: bool | None = None  # decided by the first append
        self._closed = False

    @property
    def n_rows(self) -> int:
        """Rows appended so far."""
        return self._n_rows

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check_rows(self, x: Any) -> tuple[Any, int]:
        if isinstance(x, np.ndarray):
            n, d = check_matrix_shape(x.shape, "x")
            if x.dtype.kind != "f":
                raise TypeError(f"x must have a float dtype, got {x.dtype}")
        elif is_torch_tensor(x):
            if x.device.type != "cpu":
                raise ValueError(f"x is on {x.device}; append CPU tensors (x.cpu())")
            n, d = check_matrix_shape(tuple(x.shape), "x")
            if not x.dtype.is_floating_point:
                raise TypeError(f"x must be a float tensor, got {x.dtype}")
            x = x.detach()
        else:
            raise TypeError(f"x must be a numpy array or a torch CPU tensor [n, {self.n_features}], got {describe(x)}")
        if d != self.n_features:
            raise ValueError(f"x has {d} features per row but the store has n_features={self.n_features}")
        return x, n

    def _copy_into(self, dst: np.ndarray, src: Any) -> None:
        """Casts rows into the shard buffer (no other copy, except the one temporary documented at _bf16_bits or
        from a bfloat16 tensor into a numpy storage dtype)."""
        if is_torch_tensor(src):
            import torch

            if self.dtype == "bfloat16":
                np.copyto(dst, src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
                return
            src = src.float().numpy() if src.dtype == torch.bfloat16 else src.resolve_neg().numpy()
        if self.dtype == "bfloat16":
            np.copyto(dst, _bf16_bits(src))
        else:
            np.copyto(dst, src, casting="same_kind")

    def append(self, x: Any, labels: Any = None) -> None:
        """Appends rows ``x`` ([n, n_features] float numpy array or torch CPU tensor) and, optionally, their labels
        (``[n]`` integers: every append then carries labels, written to ``labels.npy``)."""
        if self._closed:
            raise ValueError(f"the ShardWriter for {self.folder} is closed")
        x, n = self._check_rows(x)
        y = None if labels is None else load_labels(labels, n)
        if self._with_labels is None:
            self._with_labels = y is not None
            if self._with_labels:
                self._labels = _LabelsWriter(self.folder / LABELS_FILE)
        elif self._with_labels != (y is not None):
            had = "with" if self._with_labels else "without"
            raise ValueError(f"labels must be given on every append or on none; earlier appends came {had} labels")
        if y is not None:
            self._labels.append(y)  # type: ignore[union-attr]
        pos = 0
        while pos < n:
            if self._buf is None:
                self._buf = np.empty((self.rows_per_shard, self.n_features), dtype=self._storage)
            take = min(n - pos, self.rows_per_shard - self._fill)
            self._copy_into(self._buf[self._fill : self._fill + take], x[pos : pos + take])
            self._fill += take
            pos += take
            if self._fill == self.rows_per_shard:
                self._flush()
        self._n_rows += n

    def _flush(self) -> None:
        if not self._fill:
            return
        name = _shard_name(len(self._shards))
        sha = _write_npy(self.folder / name, self._buf[: self._fill])  # type: ignore[index]
        self._shards.append({"file": name, "rows": self._fill, "sha256": sha})
        self._fill = 0

    def close(self) -> None:
        """Writes the last shard, ``labels.npy`` (when labels were appended) and ``manifest.json``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        self._buf = None
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "n_features": self.n_features,
            "dtype": self.dtype,
            "n_rows": self._n_rows,
            "shards": self._shards,
        }
        if self._labels is not None:
            self._labels.finish()
            manifest["labels"] = {"file": LABELS_FILE, "rows": self._labels.rows}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / MANIFEST)

    def abort(self) -> None:
        """Stops without a manifest (the shards written so far stay, unlisted). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._buf = None
        if self._labels is not None:
            self._labels.abort()


def _items_of(data: Any, chunk_rows: int) -> tuple[Iterator[Any], int | None, int | None, str | None]:
    """(iterator over row blocks, n_rows or None, n_features or None, dtype name or None) of write_shards' data."""
    if isinstance(data, np.ndarray):
        data = ArraySource(data, chunk_rows)
    elif is_torch_tensor(data):
        data = TensorSource(data, chunk_rows)
    if isinstance(data, Source):
        return (x for x, _ in data.chunks()), data.n_rows, data.n_features, data.dtype_name
    if isinstance(data, (str, bytes, os.PathLike)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be a numpy array, a torch tensor, a Source or an iterable of [n, d] chunks (or of "
            f"(chunk, row_offset) pairs), got {describe(data)}"
        )
    return iter(data), None, None, None


def write_shards(
    folder: str | os.PathLike,
    data: Any,
    rows_per_shard: int | None = None,
    dtype: DtypeLike | None = None,
    *,
    labels: Any = None,
    overwrite: bool = False,
    chunk_rows: int = _CHUNK_ROWS,
) -> ShardSource:
    """Writes ``data`` into a new shard folder and returns it as a :class:`ShardSource`.

    ``data`` is a 2-D float numpy array (memory maps included), a torch CPU tensor, a :class:`Source`, or an iterable
    of ``[n_i, d]`` chunks (or of ``(chunk, row_offset)`` pairs, as :meth:`Source.chunks` yields). ``dtype`` is the
    storage dtype (default: the data's). ``labels`` (integers, one per row) are written to ``labels.npy``. Only one
    shard of rows is held in memory (see :class:`ShardWriter`); on an error no manifest is written.
    """
    chunk_rows = _as_int(chunk_rows, "chunk_rows", 1)
    items, n_rows, n_features, name = _items_of(data, chunk_rows)
    first = next(items, None)
    if first is None and n_features is None:
        raise ValueError("data yielded no chunks; to write an empty store pass an array of shape [0, n_features]")
    if isinstance(first, tuple) and len(first) == 2:
        items = (c[0] for c in items)
        first = first[0]
    if n_features is None:
        _, n_features = check_matrix_shape(tuple(first.shape), "the first chunk")
        name = dtype_name(first.dtype)
    lab = None
    if labels is not None:
        lab_rows = n_rows
        if lab_rows is None:  # an iterable: the labels' own length, checked against the rows at the end
            probe = open_npy(labels) if isinstance(labels, (str, os.PathLike)) else labels
            lab_rows = int(probe.shape[0]) if len(getattr(probe, "shape", ())) else 0
        lab = load_labels(labels, lab_rows)
    with ShardWriter(folder, n_features, name if dtype is None else dtype, rows_per_shard, overwrite=overwrite) as w:
        chunks = items if first is None else _chain(first, items)
        for x in chunks:
            if lab is None:
                w.append(x)
                continue
            start = w.n_rows
            if start + len(x) > len(lab):
                raise ValueError(f"labels has {len(lab)} entries but data has more rows")
            w.append(x, lab[start : start + len(x)])
        if lab is not None and w.n_rows != len(lab):
            raise ValueError(f"labels has {len(lab)} entries but the source has {w.n_rows} rows")
    return ShardSource(folder, chunk_rows=chunk_rows)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# -- reading -------------------------------------------------------------------------------------------------------
def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"malformed shard manifest {path}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain_file_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v and os.sep not in v


def read_manifest(folder: str | os.PathLike) -> dict:
    """Reads and validates ``folder/manifest.json``; ValueError naming the manifest and the problem otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{Path(folder)} has no {MANIFEST}: not a poisonguard shard folder (write one with write_shards or "
            "ShardWriter; a capture that failed leaves none)"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise _bad(path, f"expected a JSON object, got {type(m).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in m]
    if missing:
        raise _bad(path, f"missing keys {missing}")
    if m["format"] != FORMAT:
        raise _bad(path, f"format is {m['format']!r}, expected {FORMAT!r}")
    if not _is_int(m["version"]) or m["version"] != VERSION:
        raise _bad(path, f"version {m['version']!r} is not supported (this poisonguard reads version {VERSION})")
    for key in ("n_features", "n_rows"):
        if not _is_int(m[key]) or m[key] < 0:
            raise _bad(path, f"{key} must be a non-negative integer, got {m[key]!r}")
    if m["dtype"] not in FLOAT_DTYPE_NAMES:
        raise _bad(path, f"dtype must be one of {list(FLOAT_DTYPE_NAMES)}, got {m['dtype']!r}")
    if not isinstance(m["shards"], list):
        raise _bad(path, f"shards must be a list, got {type(m['shards']).__name__}")
    seen: set[str] = set()
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"file", "rows", "sha256"} <= set(s):
            raise _bad(path, f"shards[{i}] must be an object with file, rows and sha256, got {s!r}")
        if not _plain_file_name(s["file"]) or not s["file"].endswith(".npy"):
            raise _bad(path, f"shards[{i}].file must be a .npy file name inside the folder, got {s['file']!r}")
        if s["file"] in seen:
            raise _bad(path, f"shards[{i}].file {s['file']!r} is listed twice")
        seen.add(s["file"])
        if not _is_int(s["rows"]) or s["rows"] < 0:
            raise _bad(path, f"shards[{i}].rows must be a non-negative integer, got {s['rows']!r}")
        if not isinstance(s["sha256"], str) or not _SHA256.match(s["sha256"]):
            raise _bad(path, f"shards[{i}].sha256 must be 64 lowercase hex digits, got {s['sha256']!r}")
    total = sum(s["rows"] for s in m["shards"])
    if total != m["n_rows"]:
        raise _bad(path, f"n_rows is {m['n_rows']} but the shards hold {total} rows")
    if "labels" in m:
        lab = m["labels"]
        if not isinstance(lab, dict) or not _plain_file_name(lab.get("file")) or lab.get("rows") != m["n_rows"]:
            raise _bad(path, f"labels must be {{'file': <name>, 'rows': {m['n_rows']}}}, got {lab!r}")
    return m


@dataclass(frozen=True)
class Shard:
    """One shard file of a :class:`ShardSource`: rows ``[offset, offset + rows)`` of the store."""

    path: Path
    rows: int
    offset: int
    sha256: str


class ShardSource(Source):
    """A shard folder as a :class:`Source` (see the module docstring for the layout).

    Chunks are views of memory-mapped shards (no copies; pages released as for ``.npy`` files) and never span two
    shards: a chunk at the end of a shard may hold fewer than :attr:`chunk_rows` rows (choose ``rows_per_shard`` as
    a multiple of ``chunk_rows``, as the default does, to avoid that). Row offsets count across shards. bfloat16
    stores yield torch bfloat16 tensors (views of the mapped bit patterns; needs torch) and report
    ``dtype == "bfloat16"``; the others yield numpy arrays.

    ``verify`` runs when the source is made: ``"size"`` (default) checks every shard's existence, ``.npy`` header
    (shape, dtype) and file size against the manifest; ``"sha256"`` also hashes every shard (reads the whole store
    once); ``"none"`` defers those checks. Whatever ``verify`` says, each shard's header and size are checked again
    when a pass opens it. Problems raise ValueError naming the file.
    """

    def __init__(self, folder: str | os.PathLike, verify: str = "size", chunk_rows: int = _CHUNK_ROWS) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        self._name = m["dtype"]
        self._storage = storage_dtype(self._name)
        dtype = self._name if self._name == "bfloat16" else self._storage
        super().__init__(m["n_rows"], m["n_features"], dtype, chunk_rows)
        shards, offset = [], 0
        for s in m["shards"]:
            shards.append(Shard(self.folder / s["file"], s["rows"], offset, s["sha256"]))
            offset += s["rows"]
        self.shards: tuple[Shard, ...] = tuple(shards)
        if verify != "none":
            for shard in self.shards:
                self._check(shard)
        if verify == "sha256":
            for shard in self.shards:
                got = _sha256_of(shard.path)
                if got != shard.sha256:
                    raise ValueError(
                        f"shard {shard.path} fails its SHA-256 check: the manifest says {shard.sha256}, the file "
                        f"hashes to {got} (the file changed or is corrupt)"
                    )

    def _repr_extra(self) -> str:
        return f", folder={str(self.folder)!r}, shards={len(self.shards)}"

    @property
    def has_labels(self) -> bool:
        return "labels" in self.manifest

    def labels(self) -> np.ndarray | None:
        """The store's labels, int64 ``[n_rows]`` memory-mapped from ``labels.npy`` (``None`` when it has none)."""
        if not self.has_labels:
            return None
        path = self.folder / self.manifest["labels"]["file"]
        if not path.is_file():
            raise ValueError(f"labels file {path} listed in {self.folder / MANIFEST} is missing")
        return load_labels(path, self.n_rows)

    def _check(self, shard: Shard) -> None:
        """Checks a shard's header (shape, dtype, C order) and file size against the manifest."""
        p = shard.path
        if not p.is_file():
            raise ValueError(f"shard file {p} listed in {self.folder / MANIFEST} is missing")
        try:
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                data_start = f.tell()
        except ValueError as exc:
            raise ValueError(f"shard {p} is not a valid .npy file: {exc}") from None
        want = (shard.rows, self.n_features)
        if dt != self._storage or fortran:
            order = " in Fortran order" if fortran else ""
            raise ValueError(f"shard {p} holds {dt}{order}; the manifest says {self._name} (stored as {self._storage})")
        if tuple(shape) != want:
            raise ValueError(f"shard {p} has shape {tuple(shape)} but the manifest says {want}")
        row_bytes = self.n_features * self._storage.itemsize
        size = p.stat().st_size
        expected = data_start + shard.rows * row_bytes
        if size < expected:
            found = (size - data_start) // row_bytes if row_bytes else shard.rows
            raise ValueError(
                f"shard {p} is truncated: expected {shard.rows} rows ({expected} bytes), found {found} rows "
                f"({size} bytes)"
            )
        if size > expected:
            raise ValueError(f"shard {p} is {size - expected} bytes longer than its {shard.rows} rows")

    def _open(self, shard: Shard) -> np.ndarray:
        self._check(shard)
        # bfloat16 shards become torch tensors; torch wants a writable array, so those are mapped copy-on-write
        # (nothing is ever written, so the pages stay shared with the file).
        mode = "c" if self._name == "bfloat16" else "r"
        return np.load(shard.path, mmap_mode=mode, allow_pickle=False)

    def _read(self, depth: int) -> Iterator[ChunkItem]:
        as_bf16 = None
        if self._name == "bfloat16":
            try:
                import torch
            except ImportError as exc:  # pragma: no cover - torch is installed with the tests
                raise ImportError(
                    f"reading the bfloat16 store {self.folder} needs the optional package 'torch': pip install torch"
                ) from exc

            def as_bf16(c: np.ndarray) -> Any:
                return torch.from_numpy(c.view(np.int16)).view(torch.bfloat16)

        for shard in self.shards:
            if shard.rows == 0:
                continue
            arr = self._open(shard)
            pages = _PageReleaser(arr)
            for s in range(0, shard.rows, self.chunk_rows):
                chunk = arr[s : s + self.chunk_rows]
                if depth > 1:
                    pages.prefault(chunk)
                out = chunk if as_bf16 is None else as_bf16(chunk)
                yield out, shard.offset + s, (lambda c=chunk, p=pages: p.release(c))
