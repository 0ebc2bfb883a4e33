"""DensityClustering (DBSCAN: kd-tree in _core, FAISS): in memory against scikit-learn's DBSCAN (agreement, speed), and
out of core over a memory-mapped .npy (peak RSS, rows/s, agreement with the in-memory result on a subset).

    python bench/bench_density.py --part memory --rows 200000 --dim 10 --eps 2.0 --min-samples 10
    python bench/bench_density.py --part dims --rows 100000                       # kd-tree vs IVF, d = 8 ... 64
    python bench/bench_density.py --part generate --rows 100000000 --dim 16      # writes bench/data/gm_<rows>x16.npy
    python bench/bench_density.py --part stream --path bench/data/gm_100000000x16.npy --eps 2.0 --min-samples 1000 \
        --subset 1000000
    rm bench/data/gm_*.npy                                                        # 6.4 GB at 100M x 16

Data: a Gaussian mixture (``--centers`` centres uniform in [-20, 20]^d, spread ``--spread``) plus 5 % rows uniform
in [-22, 22]^d, rows in random order. Peak RSS is the child process's VmHWM.
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
import poisonguard as pg
from _harness import header, record, timeit

DATA = Path(__file__).with_name("data")
NOISE = 0.05


def mixture(rng: np.random.Generator, n: int, d: int, centres: np.ndarray, spread: float) -> np.ndarray:
    is_noise = rng.random(n) < NOISE
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, d))
    x[is_noise] = rng.uniform(-22, 22, (int(is_noise.sum()), d))
    return x.astype(np.float32)


def centres_for(d: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-20, 20, (k, d))


def ari(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


# -- in memory vs scikit-learn -----------------------------------------------------------------------------------------
def part_memory(args: argparse.Namespace) -> None:
    from sklearn.cluster import DBSCAN

    n, d = args.rows, args.dim
    x = mixture(np.random.default_rng(1), n, d, centres_for(d, args.centers), args.spread)
    eps, ms = args.eps, args.min_samples
    print(f"\n## in memory: float32 [{n}, {d}], {args.centers} Gaussian clusters (spread {args.spread}) + 5 % uniform")
    print(f"eps={eps}, min_samples={ms}, index={args.index}, nprobe={args.nprobe}")

    cpu: list[float] = []

    def ours():
        c0 = time.process_time()
        dc = pg.DensityClustering(eps=eps, min_samples=ms, index=args.index, nprobe=args.nprobe).fit(x)
        cpu.append(time.process_time() - c0)
        return dc

    t_ours = timeit(ours, repeat=args.repeat, warmup=1)
    dc = t_ours["result"]
    sk_est = DBSCAN(eps=eps, min_samples=ms, n_jobs=-1)
    t0, c0 = time.perf_counter(), time.process_time()
    sk = sk_est.fit(x)
    t_sk, c_sk = time.perf_counter() - t0, time.process_time() - c0
    c_ours = float(np.median(cpu[1:] if len(cpu) > 1 else cpu))
    a = ari(sk.labels_, dc.labels_)
    noise_diff = int(((sk.labels_ == -1) != (dc.labels_ == -1)).sum())
    ratio = t_sk / t_ours["median"]
    print(
        f"poisonguard: median {t_ours['median']:.2f} s (p20 {t_ours['p20']:.2f}, p80 {t_ours['p80']:.2f}); index "
        f"{dc.index_}; {dc.strategy_}; stages {json.dumps({k: round(v, 3) for k, v in dc.stage_seconds_.items()})}"
    )
    print(f"sklearn DBSCAN(n_jobs=-1, algorithm='auto'): {t_sk:.2f} s (one run)")
    print(f"clusters {dc.n_clusters_} vs {sk.labels_.max() + 1}; noise {dc.n_noise_} vs {(sk.labels_ == -1).sum()}")
    print(
        f"ARI vs sklearn {a:.5f} (target >= 0.99): {'PASS' if a >= 0.99 else 'MISS'}; rows whose noise status "
        f"differs: {noise_diff}"
    )
    print(f"speed-up {ratio:.1f}x wall (target >= 20x): {'PASS' if ratio >= 20 else 'MISS'}")
    print(
        f"CPU seconds (all threads of this process): poisonguard {c_ours:.1f} (median), sklearn {c_sk:.1f}: "
        f"{c_sk / c_ours:.1f}x"
    )
    size = f"{n}x{d} eps{eps} ms{ms}"
    record("dbscan_memory", size, "poisonguard", t_ours, f"ARI {a:.4f} {dc.index_['kind']}")
    record("dbscan_memory", size, "sklearn", {"median": t_sk, "p20": t_sk, "p80": t_sk}, f"ratio {ratio:.1f}")


# -- index choice by dimension -----------------------------------------------------------------------------------------
def part_dims(args: argparse.Namespace) -> None:
    """The exact kd-tree against FAISS IVF (the previous default above 50 000 rows) at growing d, same data, same run:
    where index="auto" should switch."""
    n = args.rows
    print(f"\n## kd-tree vs IVF by dimension: float32 [{n}, d], 20 clusters (spread 0.5) + 5 % uniform, min_samples 10")
    print("   d   eps   kdtree s   ivf s   ivf/kdtree   ARI(ivf vs exact)   noise kdtree / ivf")
    for d in (8, 16, 24, 32, 48, 64):
        eps = round(2.0 * (d / 16) ** 0.5, 2)
        x = mixture(np.random.default_rng(1), n, d, centres_for(d, args.centers), 0.5)
        res = {}
        for idx in ("kdtree", "ivf"):
            t0 = time.perf_counter()
            dc = pg.DensityClustering(eps=eps, min_samples=10, index=idx).fit(x)
            res[idx] = (time.perf_counter() - t0, dc)
        (tk, k), (ti, i) = res["kdtree"], res["ivf"]
        print(
            f"{d:4d} {eps:5.2f} {tk:10.2f} {ti:7.2f} {ti / tk:12.1f} {ari(k.labels_, i.labels_):19.4f}   "
            f"{k.n_noise_} / {i.n_noise_}"
        )
        record("dbscan_dims", f"{n}x{d} eps{eps}", "kdtree", {"median": tk, "p20": tk, "p80": tk}, "exact")
        record("dbscan_dims", f"{n}x{d} eps{eps}", "ivf", {"median": ti, "p20": ti, "p80": ti}, f"x{ti / tk:.1f}")


# -- data --------------------------------------------------------------------------------------------------------------
def data_path(n: int, d: int) -> Path:
    return DATA / f"gm_{n}x{d}.npy"


def part_generate(args: argparse.Namespace) -> None:
    from numpy.lib.format import open_memmap

    n, d = args.rows, args.dim
    DATA.mkdir(exist_ok=True)
    path = data_path(n, d)
    out = open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    centres = centres_for(d, args.centers)
    step = 1 << 20
    t0 = time.perf_counter()
    for i, s in enumerate(range(0, n, step)):
        e = min(n, s + step)
        out[s:e] = mixture(np.random.default_rng([2, i]), e - s, d, centres, args.spread)
        out.flush()
        out._mmap.madvise(__import__("mmap").MADV_DONTNEED)  # keep this process small; the file keeps the rows
    del out
    print(f"wrote {path} ({n * d * 4 / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s")


# -- out of core -------------------------------------------------------------------------------------------------------
def _stream_child(args: argparse.Namespace) -> None:
    import psutil

    base = psutil.Process().memory_info().rss
    dc = pg.DensityClustering(
        eps=args.eps, min_samples=args.min_samples, mode="stream", memory_budget=args.budget, progress=True
    )
    t0 = time.perf_counter()
    dc.fit(args.path)
    wall = time.perf_counter() - t0
    np.save(args.out, np.asarray(dc.labels_[: args.subset]))
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps({"base": base, "peak": peak, "wall": wall, "report": dc.report()}))


def part_stream(args: argparse.Namespace) -> None:
    x = np.load(args.path, mmap_mode="r")
    n, d = x.shape
    print(
        f"\n## out of core: {args.path} float32 [{n}, {d}] ({n * d * 4 / 1e9:.2f} GB), memory budget "
        f"{args.budget / 2**30:.1f} GiB, eps={args.eps}, min_samples={args.min_samples}"
    )
    out = str(Path(args.path).with_suffix(".labels.npy"))
    cmd = [
        sys.executable,
        __file__,
        "--stream-child",
        "--path",
        args.path,
        "--eps",
        str(args.eps),
        "--min-samples",
        str(args.min_samples),
        "--budget",
        str(args.budget),
        "--subset",
        str(args.subset),
        "--out",
        out,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stderr.write(res.stderr[-2000:])
    if res.returncode:
        raise SystemExit(res.returncode)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    rep = r["report"]
    peak = r["peak"] / 2**30
    print(
        f"wall {r['wall']:.1f} s = {n / r['wall']:.0f} rows/s overall; stages "
        f"{json.dumps({k: round(v, 1) for k, v in rep['stage_seconds'].items()})}"
    )
    print(f"stream: {json.dumps(rep['stream'])}")
    print(
        f"clusters {rep['n_clusters']}, noise {rep['n_noise']}; peak RSS {peak:.2f} GiB (target <= 2 GiB): "
        f"{'PASS' if peak <= 2 else 'MISS'}"
    )
    record(
        "dbscan_stream",
        f"{n}x{d} eps{args.eps} ms{args.min_samples}",
        "poisonguard",
        {"median": r["wall"], "p20": r["wall"], "p80": r["wall"]},
        f"peak RSS {peak:.2f} GiB",
    )

    m = min(args.subset, n)
    ms_sub = max(2, round(args.min_samples * m / n))
    sub = np.ascontiguousarray(x[:m])
    t0 = time.perf_counter()
    mem = pg.DensityClustering(eps=args.eps, min_samples=ms_sub, mode="memory", nprobe=args.nprobe).fit(sub)
    t_mem = time.perf_counter() - t0
    lab = np.load(out)
    os.unlink(out)
    a = ari(mem.labels_, lab)
    print(
        f"in memory on the first {m} rows (min_samples scaled to {ms_sub}, index {mem.index_}): {t_mem:.1f} s, "
        f"clusters {mem.n_clusters_}, noise {mem.n_noise_}"
    )
    print(
        f"ARI out-of-core vs in-memory on those rows {a:.4f} (target >= 0.95): {'PASS' if a >= 0.95 else 'MISS'}; "
        f"noise status differs on {int(((mem.labels_ == -1) != (lab == -1)).sum())} rows"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["memory", "dims", "generate", "stream"], default="memory")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--centers", type=int, default=20)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=2.0)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--index", default="auto")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--path", default=None)
    p.add_argument("--budget", type=int, default=1 << 30)
    p.add_argument("--subset", type=int, default=1_000_000)
    p.add_argument("--out", default=None)
    p.add_argument("--stream-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stream_child:
        _stream_child(args)
        return
    header("DensityClustering")
    {"memory": part_memory, "dims": part_dims, "generate": part_generate, "stream": part_stream}[args.part](args)


if __name__ == "__main__":
    main()
