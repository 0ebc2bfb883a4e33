"""Loads the compiled module after its BLAS (the scipy-openblas32 wheel) is in the process.

The extension records ``libscipy_openblas.so`` by name and an rpath to the wheel installed beside it; loading the
library by full path first makes the import work from any layout (editable installs, relocated environments).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys


def _preload_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError("poisonguard needs the scipy-openblas32 package: pip install scipy-openblas32") from exc
    libdir = scipy_openblas32.get_lib_dir()
    # OpenBLAS worker threads spin for up to ~2^28 cycles after each call (OPENBLAS_THREAD_TIMEOUT, read when the
    # library loads). Our own threads run between BLAS calls (gathers, merges) and would compete with that spinning
    # on every core, so this process's copy sleeps at once instead, unless the user chose a value.
    previous = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    if previous is None:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    names = [f for f in os.listdir(libdir) if f.startswith("libscipy_openblas") and (".so" in f or ".dylib" in f)]
    try:
        for name in sorted(names):
            ctypes.CDLL(os.path.join(libdir, name), mode=getattr(os, "RTLD_GLOBAL", 0) | ctypes.RTLD_GLOBAL)
    finally:
        if previous is None:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]


def load_core():
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        _preload_openblas()
    return importlib.import_module("poisonguard._core")
