"""poisonguard's parallel loops on torch's OpenMP threads.

torch runs its CPU operators on an OpenMP team (its own ``libgomp``), whose workers keep spinning for several
milliseconds after each operator. Threads that poisonguard started for its own loops right after a torch operator
(the tracker's kernels run inside ``backward``) would share the cores with those spinning workers and run at about
half speed. So, once ``poisonguard.torch`` is imported, the loops run as parallel regions of torch's own runtime,
whose workers pick them up at once. ``POISONGUARD_OWN_THREADS=1`` in the environment keeps threads of our own.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

from .. import _core


def _torch_libgomp() -> Path | None:
    """torch's bundled libgomp when it is loaded in this process (Linux wheels), else None."""
    libdir = Path(torch.__file__).parent / "lib"
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:  # pragma: no cover - not Linux
        return None
    for path in sorted(loaded):
        p = Path(path)
        if p.parent == libdir and p.exists():
            return p
    return None


def share_torch_openmp() -> bool:
    """Routes poisonguard's parallel loops through torch's OpenMP runtime; returns whether it did."""
    if os.environ.get("POISONGUARD_OWN_THREADS", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    path = _torch_libgomp()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(str(path))  # already loaded: the same handle, no second runtime
        addrs = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _SYMBOLS]
    except (OSError, AttributeError):  # pragma: no cover - a libgomp without the GNU entry points
        return False
    if not all(addrs):  # pragma: no cover
        return False
    if not _core.openmp_runtime_set():
        _core.set_openmp_runtime(*addrs)
    return True


_SYMBOLS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
