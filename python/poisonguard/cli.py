"""The ``poisonguard`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import poisonguard

    info = poisonguard.build_info()
    info["has_cuda"] = poisonguard.has_cuda()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(out=args.out, fraction=args.fraction, target=args.target, seed=args.seed, epochs=args.epochs)
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from .workflow import scan

    fraction: float | str = args.expected_poison_fraction
    if fraction != "auto":
        try:
            fraction = float(fraction)
        except ValueError:
            raise SystemExit(f"--expected-poison-fraction must be a number or 'auto', got {fraction!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    consensus: str | int | None = None
    if args.consensus is not None:
        consensus = int(args.consensus) if args.consensus.isdigit() else args.consensus
    evidence = {}
    for key, path in (("losses", args.losses), ("grad_norms", args.grad_norms)):
        if path:
            import numpy as np

            evidence[key] = np.load(path, allow_pickle=False)
    result = scan(
        args.activations,
        args.labels,
        methods=methods,
        expected_poison_fraction=fraction,
        consensus=consensus,
        chunk_rows=args.chunk_rows,
        progress=not args.quiet,
        **evidence,
    )
    print(f"scanned {len(result.is_poison)} samples with {', '.join(result.flags)} in {result.seconds:.2f} s")
    print(result.table())
    if len(result.flags) > 1:
        print("flagged by both (rows x columns):")
        print(result.overlap_table())
    else:
        print(f"flagged ({result.consensus}): {int(result.is_poison.sum())}")
    if args.out:
        print(f"results written to {result.save(args.out)}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poisonguard",
        description="Find poisoned training data and hidden backdoors in ML models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what was built (version, CUDA, BLAS, threads, compiler)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    sc = sub.add_parser("scan", help="scan activations for poisoned samples (spectral signatures, SPECTRE)")
    sc.add_argument("activations", help="activations [N, d]: a .npy file or a shard folder")
    sc.add_argument("--labels", required=True, help="labels [N]: a .npy file of integer classes")
    sc.add_argument("--methods", default="spectral,spectre,clustering", help="comma-separated (default: %(default)s)")
    sc.add_argument("--expected-poison-fraction", default="auto", help="a fraction in (0, 1] or 'auto' (default)")
    sc.add_argument(
        "--consensus", default=None, help="'any', 'all' or a vote count (default: 2 votes, 'any' for one method)"
    )
    sc.add_argument("--losses", default=None, help="per-sample losses [N] or [N, epochs] (.npy): more evidence")
    sc.add_argument("--grad-norms", default=None, help="per-sample gradient norms [N] or [N, epochs] (.npy)")
    sc.add_argument("--chunk-rows", type=int, default=16384, help="rows per chunk (default: %(default)s)")
    sc.add_argument("--out", default=None, help="folder for flags, scores and summary.json")
    sc.add_argument("--quiet", action="store_true", help="no progress lines")
    sc.set_defaults(func=_cmd_scan)
    demo = sub.add_parser("demo", help="BadNets on sklearn's digits: sacrificial CNN, then scan its activations")
    demo.add_argument("--out", default="poisonguard-demo", help="folder for the results (default: %(default)s)")
    demo.add_argument("--fraction", type=float, default=0.05, help="poisoned share of the data (default: 0.05)")
    demo.add_argument("--target", type=int, default=0, help="class the poison is relabelled to (default: 0)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30, help="training epochs of the sacrificial CNN (default: 30)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
