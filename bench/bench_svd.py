"""randomized_svd at equal accuracy: poisonguard vs sklearn.utils.extmath.randomized_svd (n_iter=7) and
torch.svd_lowrank (at the smallest niter reaching the same accuracy), on matrices with a known spectrum.

The test matrix is A = U diag(s) Vᵀ (float32) with orthonormal U [m, r], V [n, r] and s_i = 10·0.8^i + 0.05: a few
dominant directions over a flat floor, the shape of activation spectra. Its singular values are known exactly, so
accuracy is measured against the truth (max relative error of the top-k values, target 1e-5) and the subspace error
is the sine of the largest principal angle between the estimated and true top-k right singular vectors.

    python bench/bench_svd.py                       # [200000, 512] and [100000, 4096]
    python bench/bench_svd.py --shapes 200000x512 --repeat 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import poisonguard as pg
from _harness import header, record, timeit
from poisonguard._reference import subspace_error

K = 10
TOL = 1e-5


def make_matrix(m: int, n: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = min(r, m, n)
    s = 10.0 * 0.8 ** np.arange(r) + 0.05
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    a = np.empty((m, n), dtype=np.float32)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)).astype(np.float32))
    for i in range(0, m, 20000):
        a[i : i + 20000] = (u[i : i + 20000] * s.astype(np.float32)) @ v.T.astype(np.float32)
    return a, s[:K], v[:, :K]


def accuracy(s_est, vt_est, s_true, v_true) -> tuple[float, float]:
    s_est = np.asarray(s_est, dtype=np.float64)[:K]
    err = float(np.max(np.abs(s_est - s_true) / s_true))
    return err, subspace_error(np.asarray(vt_est, dtype=np.float64)[:K].T, v_true)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="200000x512,100000x4096")
    p.add_argument("--rank", type=int, default=256, help="r: rank of the test matrix")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import torch

    torch.manual_seed(0)
    header("bench_svd")
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        run_shape(m, n, args)


def run_shape(m: int, n: int, args: argparse.Namespace) -> None:
    import torch
    from sklearn.utils.extmath import randomized_svd as sk_rsvd

    if True:  # one shape
        a, s_true, v_true = make_matrix(m, n, args.rank)
        at = torch.from_numpy(a)
        size = f"{m}x{n} f32 k{K}"
        print(f"\n## [{m}, {n}] float32, k={K}, oversampling 10, rank {min(args.rank, m, n)}, truth known")
        print(f"auto route: {pg.ops.svd_method(m, n, K)}")

        def ours(method: str, q: int):
            return lambda: pg.randomized_svd(a, K, n_oversamples=10, n_iter=q, seed=0, method=method)

        # Accuracy first: the smallest n_iter / niter reaching TOL for each randomized method.
        def first_accurate(make, name: str, qs=range(0, 11)):
            for q in qs:
                res = make(q)()
                err, sub = accuracy(res[1], res[2], s_true, v_true)
                if err <= TOL:
                    return q, err, sub
            print(f"  {name}: never reached {TOL} up to n_iter={qs[-1]}")
            return None, err, sub

        q_ours, e_ours, sub_ours = first_accurate(lambda q: ours("randomized", q), "poisonguard randomized")

        def torch_lowrank(q: int):
            def run():
                u, s, v = torch.svd_lowrank(at, q=K + 10, niter=q)
                return u, s, v.T

            return run

        q_torch, e_torch, sub_torch = first_accurate(torch_lowrank, "torch")
        rows = []
        res = ours("gram", 0)()
        e, sub = accuracy(res[1], res[2], s_true, v_true)
        rows.append(("poisonguard gram (exact)", ours("gram", 0), e, sub, "-"))
        if q_ours is not None:
            rows.append(
                (f"poisonguard randomized n_iter={q_ours}", ours("randomized", q_ours), e_ours, sub_ours, q_ours)
            )
        auto_q = 4
        res = ours("auto", auto_q)()
        e, sub = accuracy(res[1], res[2], s_true, v_true)
        rows.append((f"poisonguard auto (n_iter={auto_q})", ours("auto", auto_q), e, sub, auto_q))

        def sk():
            return sk_rsvd(a, K, n_oversamples=10, n_iter=7, random_state=0)

        res = sk()
        e, sub = accuracy(res[1], res[2], s_true, v_true)
        rows.append(("sklearn randomized_svd n_iter=7", sk, e, sub, 7))
        if q_torch is not None:
            rows.append((f"torch.svd_lowrank niter={q_torch}", torch_lowrank(q_torch), e_torch, sub_torch, q_torch))
        print(f"{'impl':<40}{'median s':>10}{'p20':>8}{'p80':>8}{'max rel err S':>15}{'subspace err':>14}")
        times = {}
        for name, fn, e, sub, _ in rows:
            t = timeit(fn, repeat=args.repeat)
            times[name] = t["median"]
            print(f"{name:<40}{t['median']:>10.3f}{t['p20']:>8.3f}{t['p80']:>8.3f}{e:>15.1e}{sub:>14.1e}")
            record("randomized_svd", size, name, t, f"max rel err {e:.1e}, subspace {sub:.1e}")
        ours_best = min(v for k_, v in times.items() if k_.startswith("poisonguard"))
        sk_t = times["sklearn randomized_svd n_iter=7"]
        print(f"speed-up, best poisonguard route vs sklearn (n_iter=7): {sk_t / ours_best:.1f}x (target >= 4)")
        print(f"speed-up, poisonguard auto vs sklearn (n_iter=7): {sk_t / times[rows[2][0]]:.1f}x")
        tk = [v for k_, v in times.items() if k_.startswith("torch")]
        if tk:
            print(f"ratio torch.svd_lowrank / best poisonguard: {tk[0] / ours_best:.2f} (target >= 1)")


if __name__ == "__main__":
    main()
