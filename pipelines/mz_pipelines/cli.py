"""The ``mambazoo`` command: ``mambazoo info``, ``mambazoo bench <target>``, ``mambazoo <domain> <verb>``.

Domains are the subpackages ``mz_pipelines/<domain>/`` with a ``cli.py`` (see
:mod:`mz_pipelines.runtime.registry`); they are found without importing them and loaded only
when named. ``mambazoo bench kernels ...`` runs ``mz_kernels.bench.main``, ``mambazoo bench
backbones ...`` runs ``mz_backbones.bench.main``; ``mambazoo bench <domain> ...`` runs that domain's
``bench`` verb. User mistakes exit with code 2 and one ``error:`` line (``--debug`` adds the traceback).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mz_pipelines.runtime.errors import UserError, run_cli, wants_debug
from mz_pipelines.runtime.registry import CliParser, discover_domains, load_domain, suggest

COMMANDS = ("info", "bench")


def _cmd_info(args: argparse.Namespace) -> int:
    from mz_kernels.info import format_info

    print(format_info())
    return 0


def bench_targets() -> list[str]:
    """``kernels``, every domain (each domain provides a ``bench`` verb) and ``backbones``."""
    return ["kernels", *discover_domains(), "backbones"]


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "kernels":
        from mz_kernels.bench import main as bench_main

        return bench_main(args.rest)
    if args.target == "backbones":
        from mz_backbones.bench import main as backbones_bench_main

        return backbones_bench_main(args.rest)
    targets = bench_targets()
    if args.target not in targets:
        raise UserError(f"unknown bench target '{args.target}'{suggest(args.target, targets)}; expected one of {targets}")
    return load_domain(args.target).main(args.rest, prog=f"mambazoo bench {args.target}", verb="bench")


def build_parser(domains: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Top-level parser; domain commands are listed here but parsed by the domain itself."""
    domains = discover_domains() if domains is None else domains
    p = CliParser(
        prog="mambazoo", description="State-space models for images, volumes, signals, sound, trajectories and motion."
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="versions, devices and available kernel backends")
    s.set_defaults(func=_cmd_info)
    targets = ["kernels", *domains, "backbones"]
    s = sub.add_parser("bench", help=f"benchmarks: mambazoo bench {{{','.join(targets)}}} [--help]")
    s.add_argument("target", help=f"what to benchmark: one of {targets}")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    s.set_defaults(func=_cmd_bench)
    for name in domains:
        sub.add_parser(name, help=f"{name} pipeline: mambazoo {name} <verb> [--help]", add_help=False)
    return p


def _main(argv: list[str]) -> int:
    lead_debug = False
    while argv and argv[0] == "--debug":
        argv, lead_debug = argv[1:], True
    domains = discover_domains()
    if argv and argv[0] in domains:
        rest = argv[1:] + (["--debug"] if lead_debug else [])
        return load_domain(argv[0]).main(rest, prog=f"mambazoo {argv[0]}")
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        choices = [*COMMANDS, *domains]
        raise UserError(f"unknown command '{argv[0]}'{suggest(argv[0], choices)}; expected one of {choices}")
    args = build_parser(domains).parse_args(argv)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _main(args), debug=wants_debug(args))


if __name__ == "__main__":
    sys.exit(main())
