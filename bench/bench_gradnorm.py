"""Per-sample gradient norms: one training step with GradNormTracker vs a plain step, opacus GradSampleModule norms and
torch.func vmap(grad) norms, all timed in the same run; a floor step (the forward and the activation-gradient half of
the backward, no parameter gradient) and from it a bound on the ratios any tracker could show; peak memory of one
step of each (in a fresh subprocess); and a per-layer table of the ghost vs direct vs auto kernels on the layers' real
operands.

    python bench/bench_gradnorm.py                          # MLP, CNN, transformer at B=256
    python bench/bench_gradnorm.py --batch 32 --repeat 3    # quick look
    python bench/bench_gradnorm.py --models mlp --skip-vmap --no-memory

Models (float32, CPU): ``mlp`` 784 → 3×1024 (ReLU) → 10; ``cnn`` 3×32×32 → conv 32, conv 64/2, conv 64/2 (3×3, ReLU)
→ linear 10; ``transformer`` 2 pre-norm blocks (d=128, 4 heads, MLP 512, T=128, attention from Linear layers because
GradNormTracker does not track nn.MultiheadAttention) + embedding (vocab 1000) + mean-pool head.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import poisonguard as pg
import torch
from _harness import header, record, timeit
from poisonguard.ops.gradnorm import conv_grad_bookkeeping, linear_grad_bookkeeping
from poisonguard.torch import GradNormTracker
from poisonguard.torch.gradnorm import conv_operands
from torch import nn
from torch.nn import functional as F

IMPLS = ("plain", "floor", "tracker", "opacus", "vmap")


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.ff2(F.gelu(self.ff1(self.ln2(h))))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, ff: int = 512, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads, ff) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(tokens))).mean(dim=1))


def build(name: str, batch: int, seq: int = 128) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    y = torch.randint(0, 10, (batch,))
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU()
        )
        model.append(nn.Linear(1024, 10))
        return model, torch.randn(batch, 784), y
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 10),
        )
        return model, torch.randn(batch, 3, 32, 32), y
    if name == "transformer":
        return Transformer(), torch.randint(0, 1000, (batch, seq)), y
    raise ValueError(f"unknown model {name!r}")


def _norms_of(per_sample_grads: list[torch.Tensor], b: int) -> torch.Tensor:
    """Per-sample norms from per-sample gradients ``[B, ...]`` as opacus's own clipping computes them: one float32
    norm per parameter (a single pass, no copy), combined in float64. (Squaring a float64 copy of every per-sample
    gradient instead costs the baselines 25-40% of their step: 0.15 s on the CNN, 0.75 s on the transformer.)"""
    per_param = torch.stack([torch.linalg.vector_norm(g.reshape(b, -1), dim=1) for g in per_sample_grads], dim=1)
    return per_param.double().pow(2).sum(1).sqrt()


def make_step(impl: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A callable running one step of ``impl``; returns the per-sample norms (or None for the plain step)."""
    if impl == "plain":

        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return step
    if impl == "floor":
        # the forward and the activation-gradient half of the backward, with no parameter gradient at all: every
        # method that gives the batch gradient (and the norms) runs at least this, so baseline / floor bounds the
        # speed-up any tracker could show over that baseline on this machine with torch's kernels
        frozen = copy.deepcopy(model).requires_grad_(False)
        first = frozen.emb if isinstance(frozen, Transformer) else frozen[0]
        first.register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_(True))

        def step():
            F.cross_entropy(frozen(x), y).backward()

        return step
    if impl == "tracker":
        tracker = GradNormTracker(model)

        def step():
            model.zero_grad(set_to_none=True)
            with tracker:
                F.cross_entropy(model(x), y).backward()
            return tracker.norms

        return step
    if impl == "opacus":
        from opacus import GradSampleModule

        gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
        params = [p for p in gsm.parameters() if p.requires_grad]

        def step():
            gsm.zero_grad(set_to_none=True)
            for p in params:
                p.grad_sample = None
            F.cross_entropy(gsm(x), y).backward()
            return _norms_of([p.grad_sample for p in params], x.shape[0])

        return step
    if impl == "vmap":
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def step():
            return _norms_of(list(per_sample(params, x, y).values()), x.shape[0])

        return step
    raise ValueError(impl)


# -- the bound: what no method that forms the batch gradient can beat on this machine --------------------------------
def weight_grad_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Floating-point operations of the Linear/Conv weight gradients of one step (2 per multiply-add); the cheaper
    parameters (biases, LayerNorm, Embedding) are left out, so this is a lower bound."""
    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += 2.0 * out.numel() * mod.in_features
        else:
            k = mod.in_channels // mod.groups * int(np.prod(mod.kernel_size))
            total[0] += 2.0 * out.numel() * k

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def gemm_rate(n: int = 2048, repeat: int = 12) -> float:
    """float32 FLOP/s of torch's matrix product on large square matrices: the best rate this machine reaches."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# -- peak memory: one step in a fresh process -------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(model_name: str, impl: str, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, x, y = build(model_name, batch)
    step = make_step(impl, model, x, y)
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    step()
    done.set()
    th.join()
    print(json.dumps({"base": base, "peak": peak[0]}))


def peak_memory(model_name: str, impl: str, batch: int, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--worker", model_name, impl, "--batch", str(batch), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  [{impl}] memory worker failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (r["peak"] - r["base"]) / 2**20


# -- per-layer kernels ------------------------------------------------------------------------------------------------
def layer_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeat: int) -> list[dict]:
    captured: dict[str, list] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):

            def fwd(mod, inp, out, name=name):
                xin = inp[0].detach()
                out.register_hook(lambda g, mod=mod, xin=xin, name=name: captured.__setitem__(name, [mod, xin, g]))

            handles.append(m.register_forward_hook(fwd))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    rows = []
    for name, (mod, xin, g) in captured.items():
        if isinstance(mod, nn.Linear):
            a3 = xin.reshape(xin.shape[0], -1, xin.shape[-1])
            g3 = g.reshape(g.shape[0], -1, g.shape[-1])
            ops = [(a3, g3)]

            def weight_grad(a3=a3, g3=g3):
                return g3.reshape(-1, g3.shape[2]).t().mm(a3.reshape(-1, a3.shape[2]))

            def bookkeeping(a3=a3, g3=g3):
                return linear_grad_bookkeeping(a3, g3, bias=True)

        else:
            ops = conv_operands(mod, xin, g)
            a3, g3 = ops[0]
            nd = xin.dim() - 2

            def weight_grad(mod=mod, xin=xin, g=g, nd=nd):
                return torch.ops.aten.convolution_backward(
                    g,
                    xin,
                    mod.weight,
                    None,
                    mod.stride,
                    mod.padding,
                    mod.dilation,
                    False,
                    [0] * nd,
                    mod.groups,
                    (False, True, False),
                )[1]

            def bookkeeping(mod=mod, xin=xin, g=g):
                return conv_grad_bookkeeping(
                    xin,
                    g,
                    kernel_size=mod.kernel_size,
                    stride=mod.stride,
                    padding=mod.padding,
                    dilation=mod.dilation,
                    groups=mod.groups,
                    bias=True,
                )

        def ghost(ops=ops, weight_grad=weight_grad):
            weight_grad()  # autograd's weight gradient, which the ghost form leaves to autograd
            return [pg.ops.linear_grad_sqnorms(a, gg, method="ghost", bias=True) for a, gg in ops]

        chosen = pg.ops.gradnorm_method(a3.shape[1], a3.shape[2], g3.shape[2], bookkeeping=True)
        forms = {"weight grad": weight_grad, "ghost": ghost, "direct": bookkeeping}
        forms["auto"] = forms[chosen]
        t = {k: timeit(fn, repeat=repeat, warmup=1)["median"] for k, fn in forms.items()}
        rows.append(
            {
                "layer": f"{name} ({type(mod).__name__})",
                "T": a3.shape[1],
                "d_in": a3.shape[2],
                "d_out": g3.shape[2],
                **t,
                "chosen": chosen,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each runs a block of every implementation)")
    ap.add_argument("--block", type=int, default=3, help="steps per block; the first of each block is not timed")
    ap.add_argument("--threads", type=int, default=0, help="torch and poisonguard threads (0 = leave as is)")
    ap.add_argument("--skip-opacus", action="store_true")
    ap.add_argument("--skip-vmap", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    # opacus registers full backward hooks on modules whose inputs need no gradient (the first layer), and vmap has
    # no batching rule for the CPU flash-attention kernels: both say so on every call
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.threads:
        torch.set_num_threads(args.threads)
        pg.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker[0], args.worker[1], args.batch, torch.get_num_threads())
        return
    header("per-sample gradient norms: GradNormTracker vs plain step, opacus, vmap(grad)")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} torch threads, batch {args.batch}")
    impls = [i for i in IMPLS if not (i == "opacus" and args.skip_opacus) and not (i == "vmap" and args.skip_vmap)]
    for name in args.models.split(","):
        model, x, y = build(name, args.batch)
        nparams = sum(p.numel() for p in model.parameters())
        print(f"\n## {name}: {nparams / 1e6:.2f} M parameters, input {tuple(x.shape)}")
        steps = {}
        for impl in impls:
            try:
                steps[impl] = make_step(impl, model, x, y)
            except Exception as exc:  # an optional baseline that cannot run this model
                print(f"  {impl}: cannot run ({type(exc).__name__}: {exc})")
        ref = steps["tracker"]()
        for impl in ("opacus", "vmap"):
            if impl in steps:
                other = steps[impl]()
                err = float((ref - other).abs().max() / other.abs().max())
                print(f"  agreement tracker vs {impl}: max relative difference {err:.2e}")
        # time the steps in rounds of blocks: each block runs one implementation `--block` times in a row and keeps
        # all but its first step, so every implementation is timed in its own steady state (the step after a switch
        # inherits the previous one's allocator and thread state: opacus and vmap free gigabytes, after which the
        # next step's large tensors come back from the heap or from fresh pages). The block order rotates each round
        # so that load drift on a shared machine hits all of them alike.
        times: dict[str, list[float]] = {k: [] for k in steps}
        for k in steps:
            steps[k]()  # warm-up
        names = list(steps)
        for i in range(args.repeat):
            for k in names[i % len(names) :] + names[: i % len(names)]:
                for j in range(args.block):
                    t0 = time.perf_counter()
                    steps[k]()
                    if j > 0 or args.block == 1:
                        times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        mem = {}
        if not args.no_memory:
            for k in steps:
                mem[k] = peak_memory(name, k, args.batch, torch.get_num_threads())
        print(
            f"  {'impl':<10} {'median s':>10} {'p20':>8} {'p80':>8} {'vs plain':>9} {'tracker speed-up':>17}"
            f" {'peak MiB':>9}"
        )
        for k, v in times.items():
            speedup = med[k] / med["tracker"] if k in ("opacus", "vmap") else float("nan")
            m = mem.get(k)
            print(
                f"  {k:<10} {med[k]:>10.4f} {np.percentile(v, 20):>8.4f} {np.percentile(v, 80):>8.4f}"
                f" {med[k] / med['plain']:>9.2f} {speedup:>17.2f} {m if m is not None else float('nan'):>9.1f}"
            )
            t = {"median": med[k], "p20": float(np.percentile(v, 20)), "p80": float(np.percentile(v, 80))}
            record("gradnorm_step", f"{name} B={args.batch}", k, t, f"peak_MiB={m}")
        print(
            f"  targets: tracker/plain {med['tracker'] / med['plain']:.2f} (<= 1.3)"
            + (f", opacus/tracker {med['opacus'] / med['tracker']:.2f} (>= 3)" if "opacus" in med else "")
            + (f", vmap/tracker {med['vmap'] / med['tracker']:.2f} (>= 10)" if "vmap" in med else "")
        )
        if "floor" in med:
            # any step that forms the batch gradient runs the floor plus the weight gradients' arithmetic, at best at
            # the machine's large-GEMM rate; the baselines' times over that bound what any tracker could show
            flops, rate = weight_grad_flops(model, x), gemm_rate()
            bound = med["floor"] + flops / rate
            print(
                f"  bound: floor {med['floor']:.4f} s + weight gradients {flops / 1e9:.2f} GFLOP at the large-GEMM"
                f" rate {rate / 1e9:.0f} GFLOP/s = {bound:.4f} s per step at least; the most any tracker could show:"
                + ",".join(f" {k}/bound {med[k] / bound:.2f}" for k in ("plain", "opacus", "vmap") if k in med)
                + "; with the weight gradients free as well:"
                + ",".join(f" {k}/floor {med[k] / med['floor']:.2f}" for k in ("plain", "opacus", "vmap") if k in med)
            )
            record(
                "gradnorm_bound",
                f"{name} B={args.batch}",
                "bound",
                {"median": bound, "p20": bound, "p80": bound},
                f"gflop={flops / 1e9:.3f} gemm_gflops={rate / 1e9:.0f}",
            )
        # what the per-sample norms add to a training step (each step minus the plain one): the targets above compare
        # whole steps, whose shared forward and backward bound the ratios by what the baselines cost over a plain step
        extra = {k: med[k] - med["plain"] for k in med if k not in ("plain", "floor")}
        print(
            "  cost over a plain step: "
            + ", ".join(f"{k} {1e3 * v:+.1f} ms" for k, v in extra.items())
            + "".join(
                f"; {k} / tracker {extra[k] / extra['tracker']:.0f}x"
                for k in ("opacus", "vmap")
                if k in extra and extra["tracker"] > 0
            )
        )
        if not args.no_layers:
            rows = layer_table(model, x, y, max(3, args.repeat))
            print(
                f"  per-layer weight gradient + per-sample norms (median s, B={args.batch}; 'wgrad' = torch's alone,"
                " 'ghost' = torch's + ghost norms, 'direct' = book-keeping (norms and weight gradient in one),"
                " 'auto' = the tracker's choice, should match the better form)"
            )
            print(
                f"  {'layer':<28} {'T':>5} {'d_in':>6} {'d_out':>6} {'wgrad':>9} {'ghost':>9} {'direct':>9}"
                f" {'auto':>9}  chosen"
            )
            for r in rows:
                print(
                    f"  {r['layer']:<28} {r['T']:>5} {r['d_in']:>6} {r['d_out']:>6} {r['weight grad']:>9.5f}"
                    f" {r['ghost']:>9.5f} {r['direct']:>9.5f} {r['auto']:>9.5f}  {r['chosen']}"
                )


if __name__ == "__main__":
    main()
