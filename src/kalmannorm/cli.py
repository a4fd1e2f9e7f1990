"""The ``kalmannorm`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> None:
    from kalmannorm.demo import run_demo

    run_demo(
        steps=args.steps,
        batch_size=args.batch_size,
        stat_batch_size=args.stat_batch_size,
        seed=args.seed,
    )


def _bench(args: argparse.Namespace) -> None:
    from kalmannorm.bench import format_table, run_benchmark

    results = run_benchmark(quick=args.quick, compile=not args.no_compile, device=args.device)
    print(json.dumps(results, indent=2) if args.json else format_table(results))


def _norms(_: argparse.Namespace) -> None:
    from kalmannorm import available_norms

    for name, description in available_norms().items():
        print(f"{name:<10} {description}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalmannorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="BN vs BKN at statistics-batch 2 on real digits")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--stat-batch-size", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="BKN / BatchNorm time ratios on this machine")
    bench.add_argument("--quick", action="store_true", help="small sizes, no compile (< 1 min)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=_bench)

    norms = commands.add_parser("norms", help="list the registered norms")
    norms.set_defaults(run=_norms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
