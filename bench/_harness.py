"""Shared benchmark plumbing: timing (warm-up, median, p20/p80), peak memory, machine description, CSV rows."""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS_CSV = Path(__file__).with_name("results.csv")
FIELDS = ["date", "git_sha", "version", "machine", "op", "size", "impl", "median_s", "p20_s", "p80_s", "note"]


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except Exception:
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> dict:
    """Runs fn `warmup` times untimed, then `repeat` times; returns median/p20/p80 seconds and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    return {
        "median": float(np.median(t)),
        "p20": float(np.percentile(t, 20)),
        "p80": float(np.percentile(t, 80)),
        "result": result,
    }


def record(op: str, size: str, impl: str, timing: dict, note: str = "") -> None:
    """Appends one row to bench/results.csv."""
    import poisonguard

    new = not RESULTS_CSV.exists()
    with RESULTS_CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(
            {
                "date": _dt.datetime.now().isoformat(timespec="seconds"),
                "git_sha": git_sha(),
                "version": poisonguard.__version__,
                "machine": machine(),
                "op": op,
                "size": size,
                "impl": impl,
                "median_s": f"{timing['median']:.6f}",
                "p20_s": f"{timing['p20']:.6f}",
                "p80_s": f"{timing['p80']:.6f}",
                "note": note,
            }
        )


def header(title: str) -> None:
    import poisonguard

    info = poisonguard.build_info()
    print(f"# {title}")
    print(f"# {_dt.date.today()}  poisonguard {info['version']} ({git_sha()})  {machine()}")
    print(f"# BLAS: {info['blas']}; numpy {np.__version__}")


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: peak RSS deltas then include memory the allocator kept from earlier runs
    _LIBC = None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_rss_delta(fn: Callable[[], object]) -> float | None:
    """MiB: peak resident set during ``fn()`` minus the resident set before it. The peak (VmHWM) is reset first by
    writing 5 to /proc/self/clear_refs, and freed heap pages are returned with malloc_trim, so native allocations
    (C++ buffers, BLAS/LAPACK workspaces) count too. None where /proc does not allow the reset."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except OSError:
        return None
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(peak - base, 0) / 1024
