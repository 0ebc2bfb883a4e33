"""Fused trimmed cross-entropy: forward + backward against the torch eager formulation, float32 logits, CPU.

The reference is what a user would write: ``F.cross_entropy(logits, target, reduction="none")``, ``torch.topk`` of the
``k = ceil((1 − trim) · B)`` smallest losses, mean, backward. Both run in the same process on the same tensors;
agreement (value and gradient) is checked before timing, and the timed calls are interleaved (the order rotating
each round) so that a shared machine's load drifts fall on all of them alike. Peak memory: VmHWM during one
forward + backward minus the resident set before it (reset through /proc/self/clear_refs after gc + malloc_trim,
so torch's CPU allocations and the C++ buffers count), in separate untimed runs; the logits and targets exist
beforehand and are excluded. "ours" is the default configuration (poisonguard.torch.trim.EAGER_GRADIENT = True:
the forward pass writes the gradient where it can); also timed: EAGER_GRADIENT = False (gradient computed by the
backward pass from the logits).

    python bench/bench_trim.py                          # the three target sizes
    python bench/bench_trim.py --sizes 4096x1000 --repeat 9 --trim 0.2
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import poisonguard as pg
from _harness import header, peak_rss_delta, record
from poisonguard.ops.trim import keep_count
from poisonguard.torch import trim as pg_trim
from poisonguard.torch import trimmed_cross_entropy

DEFAULT_SIZES = "65536x1000,4096x1000,65536x10"


def interleaved(fns: dict, repeat: int, warmup: int = 1) -> dict:
    """Times several functions in rounds, the order rotating each round, so that drifts in a shared machine's load
    fall on all of them alike; returns {name: {median, p20, p80}} like _harness.timeit."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(repeat):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median": float(np.median(v)),
            "p20": float(np.percentile(v, 20)),
            "p80": float(np.percentile(v, 80)),
        }
        for name, v in times.items()
    }


DEFAULT_EAGER = pg_trim.EAGER_GRADIENT


def ours(x: torch.Tensor, t: torch.Tensor, trim: float, eager: bool = DEFAULT_EAGER, smoothing: float = 0.0) -> float:
    x.grad = None
    pg_trim.EAGER_GRADIENT = eager
    try:
        loss = trimmed_cross_entropy(x, t, trim, label_smoothing=smoothing)
    finally:
        pg_trim.EAGER_GRADIENT = DEFAULT_EAGER
    loss.backward()
    return float(loss.detach())


def reference(x: torch.Tensor, t: torch.Tensor, trim: float, smoothing: float = 0.0) -> float:
    x.grad = None
    k = keep_count(t.shape[0], trim)
    rows = F.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
    loss = torch.topk(rows, k, largest=False, sorted=False).values.mean()
    loss.backward()
    return float(loss.detach())


def bench_size(b: int, c: int, trim: float, repeat: int, smoothing: float = 0.0) -> dict:
    ours_s = functools.partial(ours, smoothing=smoothing)
    reference_ = functools.partial(reference, smoothing=smoothing)
    g = torch.Generator().manual_seed(b + c)
    x = (torch.randn(b, c, generator=g) * 2).requires_grad_(True)
    t = torch.randint(0, c, (b,), generator=g)
    # Agreement first.
    v_ref = reference_(x, t, trim)
    g_ref = x.grad.clone()
    v_ours = ours_s(x, t, trim)
    err_v = abs(v_ours - v_ref) / abs(v_ref)
    err_g = float(torch.linalg.norm((x.grad - g_ref).double()) / torch.linalg.norm(g_ref.double()))
    v_eager = ours_s(x, t, trim, eager=not DEFAULT_EAGER)
    err_e = float(torch.linalg.norm((x.grad - g_ref).double()) / torch.linalg.norm(g_ref.double()))
    if abs(v_eager - v_ours) > 1e-6 * abs(v_ours) or err_e > 1e-5:
        raise RuntimeError(f"EAGER_GRADIENT variants disagree: value {v_eager} vs {v_ours}, gradient error {err_e:.1e}")
    del g_ref
    x.grad = None
    mem_ours = peak_rss_delta(lambda: ours_s(x, t, trim))
    x.grad = None
    mem_ref = peak_rss_delta(lambda: reference_(x, t, trim))
    x.grad = None
    # Millisecond-scale calls are timed more often (at least ~0.3 s of the reference per size): a median of 7 of
    # them moves by ±30% from one run to the next.
    t0 = time.perf_counter()
    reference_(x, t, trim)
    x.grad = None
    rounds = max(repeat, min(2000, int(0.3 / max(time.perf_counter() - t0, 1e-6))))
    tm = interleaved(
        {
            "ours": lambda: ours_s(x, t, trim),
            "ref": lambda: reference_(x, t, trim),
            "eager": lambda: ours_s(x, t, trim, eager=not DEFAULT_EAGER),
        },
        rounds,
        warmup=3,
    )
    t_ours, t_ref, t_eager = tm["ours"], tm["ref"], tm["eager"]
    size = f"{b}x{c} f32 trim{trim}" + (f" smoothing{smoothing}" if smoothing else "")
    record("trimmed_cross_entropy_fwd_bwd", size, "poisonguard", t_ours, f"peak +{mem_ours} MiB")
    record("trimmed_cross_entropy_fwd_bwd", size, "torch CE+topk+mean", t_ref, f"peak +{mem_ref} MiB")
    other = "poisonguard EAGER_GRADIENT=" + str(not DEFAULT_EAGER)
    record("trimmed_cross_entropy_fwd_bwd", size, other, t_eager)
    return {
        "size": f"{b}x{c}",
        "err_v": err_v,
        "err_g": err_g,
        "ours": t_ours,
        "ref": t_ref,
        "eager": t_eager,
        "mem_ours": mem_ours,
        "mem_ref": mem_ref,
        "floor_mib": b * c * 4 / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated BxC list (default: %(default)s)")
    p.add_argument("--trim", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--label-smoothing", type=float, default=0.0, help="for ours and the reference alike")
    args = p.parse_args()
    header("bench_trim")
    print(
        f"# torch {torch.__version__}, torch threads {torch.get_num_threads()}, poisonguard threads "
        f"{pg.get_num_threads()}; float32 logits, trim {args.trim}, label smoothing {args.label_smoothing}, "
        "forward + backward"
    )
    rows = []
    for s in args.sizes.split(","):
        b, c = (int(v) for v in s.lower().split("x"))
        rows.append(bench_size(b, c, args.trim, args.repeat, args.label_smoothing))
    print(
        f"\n{'size':>11} {'rel err value':>14} {'rel err grad':>13} {'ours s':>8} {'p20-p80':>15} {'torch s':>8} "
        f"{'p20-p80':>15} {'speed-up':>9} {'peak ours':>10} {'peak torch':>11} {'grad MiB':>9}"
    )
    ok = True
    for r in rows:
        o, f = r["ours"], r["ref"]
        sp = f["median"] / o["median"]
        mo = "n/a" if r["mem_ours"] is None else f"{r['mem_ours']:.0f}"
        mr = "n/a" if r["mem_ref"] is None else f"{r['mem_ref']:.0f}"
        print(
            f"{r['size']:>11} {r['err_v']:>14.1e} {r['err_g']:>13.1e} {o['median']:>8.4f} "
            f"{o['p20']:>7.4f}-{o['p80']:<7.4f} {f['median']:>8.4f} {f['p20']:>7.4f}-{f['p80']:<7.4f} "
            f"{sp:>8.2f}x {mo:>10} {mr:>11} {r['floor_mib']:>9.0f}"
        )
        mem_ok = r["mem_ours"] is None or r["mem_ref"] is None or r["mem_ours"] < r["mem_ref"]
        ok &= sp >= 2.0 and mem_ok
        print(
            f"{'':>11} speed-up {sp:.2f}x (target >= 2x) {'PASS' if sp >= 2 else 'MISS'}; peak memory "
            f"{mo} vs {mr} MiB (target: lower) {'PASS' if mem_ok else 'MISS'}"
        )
    print(
        f"\nEAGER_GRADIENT={not DEFAULT_EAGER} (default {DEFAULT_EAGER}; True: the forward pass writes the gradient, "
        "float32 with more than 16 classes):"
    )
    for r in rows:
        e, o = r["eager"], r["ours"]
        print(
            f"{r['size']:>11} variant {e['median']:.4f} s ({e['p20']:.4f}-{e['p80']:.4f}) vs default "
            f"{o['median']:.4f} s: ratio variant/default {e['median'] / o['median']:.2f}"
        )
    print(
        f"\noverall: {'PASS' if ok else 'MISS'} (peak MiB = extra resident memory during one forward + backward; "
        "'grad MiB' = size of the gradient itself)"
    )


if __name__ == "__main__":
    main()
