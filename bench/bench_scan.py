"""A scan over an activation store larger than the memory budget: peak RSS and rows/s, with the streaming covariance
kernel's standalone pass over the same file as the reference, in the same run.

    python bench/bench_scan.py --rows 20000000 --dim 256 --classes 100      # a 10 GB float16 .npy
    python bench/bench_scan.py --rows 2000000 --dim 256 --classes 100       # a quick 1 GB version
    python bench/bench_scan.py --rows 500000 --dim 8192 --classes 100 --rank 32   # 8 GB of wide conv features

``--rank R`` gives every class a rank-R structure (decaying scales) plus small noise, as real activations have, instead
of isotropic noise around the class centre. Where the per-class covariances do not fit the memory budget (G·d² too
large, e.g. d = 8192 and 100 classes), the standalone covariance pass is skipped and the scan runs on the subspace
route; its passes and residual are printed.

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


def make_store(path: Path, rows: int, dim: int, classes: int, seed: int = 0, rank: int = 0) -> None:
    if path.exists() and path.with_suffix(".labels.npy").exists():
        return
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    labels = rng.integers(0, classes, rows).astype(np.int64)
    centres = rng.standard_normal((classes, dim)).astype(np.float32) * 2
    if rank:
        scales = (3.0 * 0.85 ** np.arange(rank)).astype(np.float32)
        factors = rng.standard_normal((classes, rank, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        factors *= scales[None, :, None]
    step = max(1, min(1 << 18, (256 << 20) // (4 * dim)))
    for s in range(0, rows, step):
        e = min(rows, s + step)
        if rank:
            block = rng.standard_normal((e - s, dim), dtype=np.float32) * np.float32(0.1)
            block += centres[labels[s:e]]
            coef = rng.standard_normal((e - s, rank), dtype=np.float32)
            for c in np.unique(labels[s:e]):
                sel = np.flatnonzero(labels[s:e] == c)
                block[sel] += coef[sel] @ factors[c]
        else:
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
        extra = {
            "flagged": int(res.is_poison.sum()),
            "n_components": res.meta["n_components"],
            "solver": res.meta["solver"],
        }
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
    p.add_argument("--rank", type=int, default=0, help="per-class rank-R structure plus small noise (0: isotropic)")
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
    suffix = f"_r{args.rank}" if args.rank else ""
    path = work / f"store_{args.rows}x{args.dim}_g{args.classes}{suffix}.npy"
    t0 = time.perf_counter()
    make_store(path, args.rows, args.dim, args.classes, rank=args.rank)
    gb = path.stat().st_size / 2**30
    print(f"store {path.name}: [{args.rows}, {args.dim}] float16, {args.classes} classes, {gb:.2f} GiB "
          f"(ready in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    size = f"{args.rows}x{args.dim} f16 G{args.classes}"
    from poisonguard.detect._twopass import DEFAULT_MEMORY_BUDGET, covariance_bytes

    fits = covariance_bytes(args.classes, args.dim) <= DEFAULT_MEMORY_BUDGET
    kinds = [("covariance", "-")] if fits else []
    if not fits:
        print(f"per-class covariances need {covariance_bytes(args.classes, args.dim) / 2**30:.0f} GiB > the "
              f"{DEFAULT_MEMORY_BUDGET / 2**30:.0f} GiB budget: no standalone covariance pass; scans take the "
              "subspace route")  # fmt: skip
    rows = []
    for kind, methods in [*kinds, ("scan", "spectral"), ("scan", "spectral,spectre")]:
        r = run_child(kind, str(path), str(args.chunk), methods)
        name = "StreamingCovariance pass" if kind == "covariance" else f"scan {methods}"
        extra_mb = (r["peak"] - r["base"]) / 2**20
        rows.append((name, r))
        timing = {"median": r["seconds"], "p20": r["seconds"], "p80": r["seconds"]}
        record("scan_store", size, name, timing, f"peak RSS {r['peak'] / 2**20:.0f} MiB")
        solver = r.get("solver")
        how = f"  {solver['solver']}, {solver['passes']} passes, residual {solver['residual']:.1e}" if solver else ""
        print(
            f"{name:<28} {r['seconds']:8.1f} s  {r['rows'] / r['seconds'] / 1e3:8.1f} k rows/s  "
            f"peak RSS {r['peak'] / 2**20:6.0f} MiB (+{extra_mb:.0f} over import){how}"
        )
    if not fits:
        os.sync()
        return
    cov_rate = rows[0][1]["rows"] / rows[0][1]["seconds"]
    for name, r in rows[1:]:
        rate = r["rows"] / r["seconds"]
        per_pass = r["solver"]["passes"] * rate  # passes over the store
        print(f"{name}: {rate / cov_rate:.0%} of the covariance pass's rows/s overall, {per_pass / cov_rate:.0%} per "
              f"pass ({r['solver']['passes']} passes); peak RSS {r['peak'] / 2**30:.2f} GiB")  # fmt: skip
    os.sync()


if __name__ == "__main__":
    main()
