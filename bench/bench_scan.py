"""A scan over an activation store larger than the memory budget: peak RSS and rows/s, with the streaming covariance
kernel's standalone pass over the same file as the reference, in the same run.

    python bench/bench_scan.py --rows 20000000 --dim 256 --classes 100      # a 10 GB float16 .npy
    python bench/bench_scan.py --rows 2000000 --dim 256 --classes 100       # a quick 1 GB version

The file is written once under --work (default bench/data/) and reused. Each measurement runs in a child process so
its peak RSS (VmHWM) is its own; RSS counts the pages of the memory-mapped file, which the sources release after
each chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import header, record


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def make_store(path: Path, rows: int, dim: int, classes: int, seed: int = 0) -> None:
    if path.exists() and path.with_suffix(".labels.npy").exists():
        return
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    labels = rng.integers(0, classes, rows).astype(np.int64)
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * 2
    step = 1 << 18
    for s in range(0, rows, step):
        e = min(rows, s + step)
        block = rng.standard_normal((e - s, dim), dtype=np.float32)
        block += centres[labels[s:e]]
        mm[s:e] = block.astype(np.float16)
    mm.flush()
    del mm
    np.save(path.with_suffix(".labels.npy"), labels)


def child(kind: str, path: str, chunk: int, methods: str) -> None:
    import poisonguard as pg
    from poisonguard.sources import as_source, load_labels

    base = _rss()
    src = as_source(path, chunk_rows=chunk)
    labels = load_labels(str(Path(path).with_suffix(".labels.npy")), src.n_rows)
    t0 = time.perf_counter()
    if kind == "covariance":
        acc = pg.StreamingCovariance(src.n_features, int(labels.max()) + 1)
        for x, off in src.chunks():
            acc.update(x, labels[off : off + x.shape[0]])
        acc.covariance()
        extra = {}
    else:
        res = pg.scan(path, labels, methods=tuple(methods.split(",")), chunk_rows=chunk)
        extra = {"flagged": int(res.is_poison.sum()), "n_components": res.meta["n_components"]}
    dt = time.perf_counter() - t0
    print(json.dumps({"base": base, "peak": _peak_rss(), "seconds": dt, "rows": src.n_rows, **extra}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--chunk", type=int, default=65536)
    p.add_argument("--work", default=str(Path(__file__).parent / "data"))
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, path, chunk, methods = args.child
        child(kind, path, int(chunk), methods)
        return
    header("bench_scan")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"store_{args.rows}x{args.dim}_g{args.classes}.npy"
    t0 = time.perf_counter()
    make_store(path, args.rows, args.dim, args.classes)
    gb = path.stat().st_size / 2**30
    print(f"store {path.name}: [{args.rows}, {args.dim}] float16, {args.classes} classes, {gb:.2f} GiB "
          f"(ready in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    size = f"{args.rows}x{args.dim} f16 G{args.classes}"
    rows = []
    for kind, methods in [("covariance", "-"), ("scan", "spectral"), ("scan", "spectral,spectre")]:
        r = run_child(kind, str(path), str(args.chunk), methods)
        name = "StreamingCovariance pass" if kind == "covariance" else f"scan {methods}"
        extra_mb = (r["peak"] - r["base"]) / 2**20
        rows.append((name, r))
        timing = {"median": r["seconds"], "p20": r["seconds"], "p80": r["seconds"]}
        record("scan_store", size, name, timing, f"peak RSS {r['peak'] / 2**20:.0f} MiB")
        print(
            f"{name:<28} {r['seconds']:8.1f} s  {r['rows'] / r['seconds'] / 1e6:6.2f} M rows/s  "
            f"peak RSS {r['peak'] / 2**20:6.0f} MiB (+{extra_mb:.0f} over import)"
        )
    cov_rate = rows[0][1]["rows"] / rows[0][1]["seconds"]
    for name, r in rows[1:]:
        rate = r["rows"] / r["seconds"]
        per_pass = 2 * rate  # two passes over the store
        print(f"{name}: {rate / cov_rate:.0%} of the covariance pass's rows/s overall, {per_pass / cov_rate:.0%} per "
              f"pass (two passes); peak RSS {r['peak'] / 2**30:.2f} GiB")  # fmt: skip
    os.sync()


if __name__ == "__main__":
    main()
