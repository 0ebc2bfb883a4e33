"""StreamingCovariance: accuracy (vs float64 two-pass and the naive one-pass formula), speed (vs numpy SYRK on the
whole array and np.cov per class), and resident memory over a memory-mapped .npy larger than the budget.

    python bench/bench_covariance.py                 # all three parts, default sizes
    python bench/bench_covariance.py --part speed --rows 200000 --dim 512 --classes 10 --chunk 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import poisonguard as pg
from _harness import header, record, timeit
from poisonguard._reference import _covariance, _naive_covariance
from poisonguard.sources import iter_row_chunks, open_npy


def rel_fro(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def stream(x: np.ndarray, g: np.ndarray | None, n_classes: int, chunk: int) -> pg.StreamingCovariance:
    acc = pg.StreamingCovariance(x.shape[1], n_classes)
    for xc, s in iter_row_chunks(x, chunk):
        acc.update(xc, None if g is None else g[s : s + chunk])
    return acc


def part_accuracy(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    n, d, k = args.acc_rows, args.acc_dim, args.classes
    x = (rng.standard_normal((n, d)) + 1e4).astype(np.float32)  # mean offset 1e4, unit spread
    g = rng.integers(0, k, n)
    _, _, ref = _covariance(x, g, k)  # float64 two-pass on the same float32 values
    ours = stream(x, g, k, args.chunk).covariance()
    naive32 = np.stack([_naive_covariance(x[g == c]) for c in range(k)])
    naive64 = np.stack([_naive_covariance(x[g == c].astype(np.float64)) for c in range(k)])
    e_ours, e32, e64 = rel_fro(ours, ref), rel_fro(naive32.astype(np.float64), ref), rel_fro(naive64, ref)
    print(f"\n## accuracy: float32 [{n}, {d}], {k} classes, mean offset 1e4, unit spread, chunks of {args.chunk}")
    print("relative Frobenius error vs float64 two-pass reference (target <= 1e-6)")
    print(f"  poisonguard StreamingCovariance      {e_ours:.2e}   {'PASS' if e_ours <= 1e-6 else 'FAIL'}")
    print(f"  naive one-pass E[xx^T]-mu mu^T, fp32  {e32:.2e}")
    print(f"  naive one-pass E[xx^T]-mu mu^T, fp64  {e64:.2e}")
    t = {"median": e_ours, "p20": e_ours, "p80": e_ours}
    record("covariance_accuracy", f"{n}x{d} f32 off1e4 G{k}", "poisonguard", t, "relative Frobenius error")
    record("covariance_accuracy", f"{n}x{d} f32 off1e4 G{k}", "naive_fp32", {"median": e32, "p20": e32, "p80": e32})


def part_speed(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    n, d, k, chunk = args.rows, args.dim, args.classes, args.chunk
    x = rng.standard_normal((n, d), dtype=np.float32)
    g = rng.integers(0, k, n)
    size = f"{n}x{d} f32 G{k} chunk{chunk}"
    # Agreement first.
    sub = slice(0, min(n, 50000))
    _, _, ref = _covariance(x[sub], g[sub], k)
    err = rel_fro(stream(x[sub], g[sub], k, chunk).covariance(), ref)
    print(f"\n## speed: float32 [{n}, {d}], {k} classes, chunks of {chunk} (agreement on 50k rows: {err:.1e})")
    t_ours = timeit(lambda: stream(x, g, k, chunk), repeat=args.repeat)
    t_syrk = timeit(lambda: x.T @ x, repeat=args.repeat)
    t_cov = timeit(lambda: [np.cov(x[g == c], rowvar=False) for c in range(k)], repeat=args.repeat)
    t_one = timeit(lambda: stream(x, None, 1, chunk), repeat=args.repeat)
    rows = [
        ("poisonguard, 10 classes", t_ours),
        ("poisonguard, ungrouped", t_one),
        ("numpy x.T @ x (whole array, SYRK)", t_syrk),
        ("np.cov per class", t_cov),
    ]
    print(f"{'impl':<38}{'median s':>10}{'p20':>9}{'p80':>9}")
    for name, t in rows:
        print(f"{name:<38}{t['median']:>10.3f}{t['p20']:>9.3f}{t['p80']:>9.3f}")
        record("covariance_update", size, name, t)
    r1 = t_ours["median"] / t_syrk["median"]
    r2 = t_cov["median"] / t_ours["median"]
    print(f"ratio poisonguard / numpy SYRK = {r1:.2f}  (target <= 1.3)  {'PASS' if r1 <= 1.3 else 'MISS'}")
    print(f"speed-up vs np.cov per class = {r2:.1f}x  (target >= 3)  {'PASS' if r2 >= 3 else 'MISS'}")


def _rss_child(path: str, chunk: int, n_classes: int) -> None:
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    x = open_npy(path)
    g = (np.arange(x.shape[0]) % n_classes).astype(np.int64)  # [n] int64 ids: part of the budget
    t0 = time.perf_counter()
    acc = stream(x, g, n_classes, chunk)
    dt = time.perf_counter() - t0
    # VmHWM: the peak of this address space (ru_maxrss would carry the parent's peak over fork + exec).
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"base": base, "peak": peak, "seconds": dt, "rows": int(acc.count.sum())}))


def part_memory(args: argparse.Namespace) -> None:
    d = args.dim
    n = int(args.file_gb * 2**30 // (4 * d))
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        path = os.path.join(tmp, "acts.npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        rng = np.random.default_rng(2)
        for s in range(0, n, 65536):
            mm[s : s + 65536] = rng.standard_normal((min(65536, n - s), d), dtype=np.float32)
        mm.flush()
        del mm
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", path, "--chunk", str(args.chunk), "--classes", str(args.classes)],
            capture_output=True,
            text=True,
            check=True,
        )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    extra = (res["peak"] - res["base"]) / 2**20
    gb = n * d * 4 / 2**30
    print(f"\n## memory: pass over a {gb:.2f} GiB float32 .npy memmap [{n}, {d}], chunks of {args.chunk}")
    print(f"RSS after import {res['base'] / 2**20:.0f} MiB, peak {res['peak'] / 2**20:.0f} MiB: +{extra:.0f} MiB")
    print(f"(target <= +200 MiB)  {'PASS' if extra <= 200 else 'MISS'};  {n / res['seconds'] / 1e6:.2f} M rows/s")
    t = {"median": res["seconds"], "p20": res["seconds"], "p80": res["seconds"]}
    record("covariance_memmap_pass", f"{n}x{d} f32 G{args.classes}", "poisonguard", t, f"peak RSS +{extra:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "accuracy", "speed", "memory"], default="all")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--acc-rows", type=int, default=200_000)
    p.add_argument("--acc-dim", type=int, default=256)
    p.add_argument("--file-gb", type=float, default=2.0)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child, args.chunk, args.classes)
        return
    header("bench_covariance")
    if args.part in ("all", "accuracy"):
        part_accuracy(args)
    if args.part in ("all", "speed"):
        part_speed(args)
    if args.part in ("all", "memory"):
        part_memory(args)


if __name__ == "__main__":
    main()
