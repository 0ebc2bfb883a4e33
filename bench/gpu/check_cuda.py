"""GPU check of every CUDA kernel: agreement with the CPU kernel, then timing against torch.

StreamingCovariance.update, then (``other_kernels``) the fused centre-project-score kernel, the trimmed
cross-entropy (forward + backward) and the per-sample gradient norms of a linear map (ghost and direct forms).

For each case the CUDA result on a subset of rows is compared with the CPU kernel on the same rows (max over
groups of the relative Frobenius error of the covariance, and of the mean); then the full update is timed with
CUDA events (warm-up, median of --repeats) next to a plain torch baseline that does, per group,
``xk = x[g == k].float(); xc = xk - xk.mean(0); xc.T @ xc`` in float32. Prints a table and also writes it to
``$OUT/gpu_check.txt`` when ``$OUT`` is set. Exit status 1 when an error exceeds --tol.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import poisonguard
import torch
from poisonguard.ops import StreamingCovariance

# (dtype, n, d, groups, check rows, check groups). For d = 4096 the check keeps the subset's rows of groups
# 0..9 only: a [100, 4096, 4096] float64 covariance read back for both sides would take ~40 GB of host memory.
CASES = [
    ("float32", 1_000_000, 512, 10, 100_000, 10),
    ("float16", 1_000_000, 512, 10, 100_000, 10),
    ("float32", 200_000, 4096, 100, 100_000, 10),
]
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Max over groups of ||got - want||_F / ||want||_F (groups without a finite reference are skipped)."""
    worst = 0.0
    for a, b in zip(got, want):
        if not np.isfinite(b).all():
            continue
        ref = float(np.linalg.norm(b))
        err = float(np.linalg.norm(a - b))
        worst = max(worst, err / ref if ref > 0 else err)
    return worst


def check(x: torch.Tensor, g: torch.Tensor, n_groups: int, rows: int, groups: int) -> tuple[float, float]:
    xs, gs = x[:rows], g[:rows]
    if groups < n_groups:
        keep = gs < groups
        xs, gs = xs[keep], gs[keep]
    d = x.shape[1]
    gpu = StreamingCovariance(d, groups).update(xs, gs)
    cpu = StreamingCovariance(d, groups).update(xs.cpu(), gs.cpu())
    if not np.array_equal(gpu.count, cpu.count):
        raise AssertionError(f"counts differ: {gpu.count} vs {cpu.count}")
    return rel_err(gpu.covariance(), cpu.covariance()), rel_err(gpu.mean, cpu.mean)


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, first-touch of the state, cuBLAS handles
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_reference(x: torch.Tensor, g: torch.Tensor, n_groups: int, out: torch.Tensor) -> None:
    xf = x.float()
    for k in range(n_groups):
        xk = xf[g == k]
        xc = xk - xk.mean(dim=0)
        torch.matmul(xc.T, xc, out=out[k])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(b)), 1e-300))


def other_kernels(repeats: int, tol: float) -> tuple[list[str], bool]:
    """The remaining CUDA kernels, each against its CPU kernel on the same values and timed against plain torch."""
    import torch.nn.functional as F
    from poisonguard.ops import linear_grad_sqnorms, project_scores
    from poisonguard.torch import trimmed_cross_entropy

    lines, failed = [], False

    def row(op: str, shape: str, dtype: str, err: float, ours: float, ref: float) -> None:
        nonlocal failed
        failed |= not err <= tol
        line = f"{op:<26} {shape:<16} {dtype:<8} {err:>11.2e} {'':>9} {ours:>9.2f} {ref:>9.2f} {ours / ref:>10.2f}"
        print(line, flush=True)
        lines.append(line)

    # fused centre-project-score: [1M, 512], 10 classes, 8 directions each
    n, d, g, k = 1_000_000, 512, 10, 8
    for dtype in ("float16", "float32"):
        try:
            x = (torch.randn(n, d, device="cuda") + 3).to(DTYPES[dtype])
            y = torch.randint(0, g, (n,), device="cuda")
            means = torch.randn(g, d, dtype=torch.float64) + 3
            dirs = torch.linalg.qr(torch.randn(g, d, k, dtype=torch.float64))[0]
            mn, dn = means.numpy(), dirs.numpy()
            p = project_scores(x[:100_000], y[:100_000], mn, dn)[0]
            p_cpu = project_scores(x[:100_000].cpu(), y[:100_000].cpu(), mn, dn)[0]
            err = _rel(p, torch.as_tensor(p_cpu))
            md, vd = means.cuda().float(), dirs.cuda().float()

            def ref(x=x, y=y, md=md, vd=vd):
                out = torch.empty((x.shape[0], vd.shape[2]), device="cuda")
                for c in range(md.shape[0]):
                    sel = y == c
                    out[sel] = (x[sel].float() - md[c]) @ vd[c]
                return out

            ours = time_ms(lambda x=x, y=y, mn=mn, dn=dn: project_scores(x, y, mn, dn), repeats)
            row("project_scores", f"{n}x{d}/G{g}/k{k}", dtype, err, ours, time_ms(ref, repeats))
            del x, y, p
        except Exception as e:  # keep checking the other kernels
            failed = True
            lines.append(f"project_scores {dtype}: ERROR {type(e).__name__}: {e}")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()

    # trimmed cross-entropy, forward + backward
    for b, c in ((65536, 1000), (4096, 1000), (65536, 10)):
        try:
            logits = (torch.randn(b, c, device="cuda") * 2).requires_grad_(True)
            tgt = torch.randint(0, c, (b,), device="cuda")
            keep = int(-(-0.9 * b // 1))
            loss = trimmed_cross_entropy(logits, tgt, 0.1)
            loss.backward()
            g_gpu, v_gpu = logits.grad.clone(), loss.detach()
            xc = logits.detach().cpu().requires_grad_(True)
            loss_c = trimmed_cross_entropy(xc, tgt.cpu(), 0.1)
            loss_c.backward()
            err = max(_rel(v_gpu.reshape(1), loss_c.detach().reshape(1)), _rel(g_gpu, xc.grad))

            def ours_fn(logits=logits, tgt=tgt):
                logits.grad = None
                trimmed_cross_entropy(logits, tgt, 0.1).backward()

            def ref_fn(logits=logits, tgt=tgt, keep=keep):
                logits.grad = None
                per = F.cross_entropy(logits, tgt, reduction="none")
                torch.topk(per, keep, largest=False, sorted=False).values.mean().backward()

            ours, ref_ms = time_ms(ours_fn, repeats), time_ms(ref_fn, repeats)
            row("trimmed_cross_entropy", f"{b}x{c}", "float32", err, ours, ref_ms)
            del logits, tgt, g_gpu
        except Exception as e:
            failed = True
            lines.append(f"trimmed_cross_entropy {b}x{c}: ERROR {type(e).__name__}: {e}")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()

    # per-sample gradient norms of a linear map: A [B, T, d_in], G [B, T, d_out]
    bsz, t, din, dout = 256, 128, 512, 512
    for method in ("ghost", "direct"):
        try:
            a = torch.randn(bsz, t, din, device="cuda")
            gr = torch.randn(bsz, t, dout, device="cuda")
            w_gpu, _, _ = linear_grad_sqnorms(a, gr, method=method)
            w_cpu, _, _ = linear_grad_sqnorms(a[:16].cpu(), gr[:16].cpu(), method=method)
            err = _rel(torch.as_tensor(w_gpu)[:16], torch.as_tensor(w_cpu))

            def ref(a=a, gr=gr):
                return torch.einsum("bti,bto->bio", a, gr).pow(2).sum(dim=(1, 2))

            ours = time_ms(lambda a=a, gr=gr, m=method: linear_grad_sqnorms(a, gr, method=m), repeats)
            row(f"grad_sqnorms {method}", f"{bsz}x{t}x{din}>{dout}", "float32", err, ours, time_ms(ref, repeats))
            del a, gr
        except Exception as e:
            failed = True
            lines.append(f"grad_sqnorms {method}: ERROR {type(e).__name__}: {e}")
            print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    return lines, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-5, help="max relative error accepted")
    parser.add_argument("--offset", type=float, default=3.0, help="mean offset added to the unit-spread data")
    args = parser.parse_args(argv)

    if not (torch.cuda.is_available() and poisonguard.has_cuda()):
        print("no CUDA device or poisonguard built without CUDA:", poisonguard.build_info())
        return 1
    torch.manual_seed(0)
    info = poisonguard.build_info()
    lines = [
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"poisonguard {info.get('version')}  cuda {info.get('cuda_version')}  "
        f"tf32 matmul: {torch.backends.cuda.matmul.allow_tf32}",
        f"{'op':<26} {'shape':<16} {'dtype':<8} {'max rel err':>11} {'(mean)':>9} {'ours ms':>9} "
        f"{'torch ms':>9} {'ours/torch':>10}",
    ]
    print(lines[0])
    print(lines[1], flush=True)
    failed = False
    for dtype, n, d, n_groups, check_rows, check_groups in CASES:
        t0 = time.perf_counter()
        x = (torch.randn(n, d, device="cuda") + args.offset).to(DTYPES[dtype])
        g = torch.randint(0, n_groups, (n,), device="cuda")
        err_cov, err_mean = check(x, g, n_groups, check_rows, check_groups)
        failed |= not (err_cov <= args.tol and err_mean <= args.tol)

        acc = StreamingCovariance(d, n_groups)
        ours = time_ms(lambda acc=acc, x=x, g=g: acc.update(x, g), args.repeats)
        del acc
        out = torch.empty((n_groups, d, d), device="cuda")
        ref = time_ms(lambda x=x, g=g, out=out, k=n_groups: torch_reference(x, g, k, out), args.repeats)
        del out, x, g
        torch.cuda.empty_cache()
        line = (
            f"{'StreamingCovariance.update':<26} {f'{n}x{d}/G{n_groups}':<16} {dtype:<8} {err_cov:>11.2e} "
            f"{err_mean:>9.1e} {ours:>9.2f} {ref:>9.2f} {ours / ref:>10.2f}"
        )
        print(line + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        lines.append(line)
    more, more_failed = other_kernels(args.repeats, args.tol)
    lines += more
    failed |= more_failed
    lines.append(
        "max rel err: CUDA vs CPU kernel on a 100k-row subset (G=100 case: its groups 0-9), relative "
        f"Frobenius error of the covariance (and of the mean); tolerance {args.tol:g}. Times: median of "
        f"{args.repeats}, CUDA events; ours = the public update() including its input validation."
    )
    lines.append("RESULT: " + ("FAIL" if failed else "OK"))
    print("\n".join(lines[-2:]))
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_check.txt"), "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
