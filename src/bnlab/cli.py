"""The ``bnlab`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch Normalization from the math to the measurement.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a small sigmoid MLP on MNIST with and without BN")
    demo.add_argument("--steps", type=int, default=3000)
    demo.add_argument("--data-dir", default=None)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="time bnlab's BatchNorm against torch.nn in the same process")
    bench.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    bench.add_argument("--modes", default="fwd,fwdbwd,eval")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    bench.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    bench.add_argument("--json", default=None, help="write the rows to this JSON file")
    bench.set_defaults(func=_bench)
    return parser


def _bench(args) -> int:
    from . import bench
    threads = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(bench.MODES)
    if unknown:
        raise SystemExit(f"bnlab bench: unknown modes {sorted(unknown)}; choose from {bench.MODES}")
    shapes = bench.QUICK_SHAPES if args.quick else bench.DEFAULT_SHAPES
    kwargs = dict(min_repeats=3, max_repeats=5, budget_s=0.2) if args.quick else {}
    rows = bench.run(shapes, threads, modes, **kwargs)
    if args.markdown:
        print(bench.markdown(rows))
    if args.json:
        bench.save_json(rows, args.json)
    return 0


def _demo(args) -> int:
    from .lab import demo
    demo.run(steps=args.steps, data_dir=args.data_dir)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
