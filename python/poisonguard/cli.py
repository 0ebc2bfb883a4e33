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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poisonguard",
        description="Find poisoned training data and hidden backdoors in ML models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print what was built (version, CUDA, BLAS, threads, compiler)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
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
