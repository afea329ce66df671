"""The ``mambazoo`` command: ``mambazoo info``, ``mambazoo bench <target>``, ``mambazoo <domain> <verb>``."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from mz_kernels.info import format_info

    print(format_info())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "kernels":
        from mz_kernels.bench import main as bench_main

        return bench_main(args.rest)
    raise SystemExit(f"mambazoo bench: unknown target {args.target!r}; expected one of ['kernels']")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambazoo", description="State-space models for images, volumes, signals, sound, trajectories and motion.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, devices and available kernel backends")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("bench", help="benchmarks: mambazoo bench kernels [--help]")
    s.add_argument("target", help="what to benchmark: kernels")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
