"""Domains and their verbs: ``mambazoo <domain> <verb>`` and ``python -m mz_pipelines.<domain> <verb>``.

A domain is a subpackage ``mz_pipelines/<domain>/`` whose ``cli.py`` defines ``DOMAIN = Domain(...)``
and registers verbs on it; ``__main__.py`` calls ``DOMAIN.main()``. Keep ``cli.py`` free of heavy
imports (torch, MONAI ...): import them inside the verb functions, so ``--help`` and user errors are fast.

Examples:
    >>> DOMAIN = Domain("toy", help="reference domain")
    >>> @DOMAIN.verb("train", help="train a model", config=ToyConfig)
    ... def train(cfg: ToyConfig, args: argparse.Namespace) -> int: ...
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import dump_config, is_config_class, resolve_config
from .errors import UserError, run_cli, wants_debug

VerbFn = Callable[[Any, argparse.Namespace], "int | None"]
ConfigBase = Callable[[Any, argparse.Namespace], "Mapping[str, Any] | None"]

NOT_DOMAINS = frozenset({"runtime"})


class CliParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors raise :class:`UserError` (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``''``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class Verb:
    """One command of a domain.

    Attributes:
        name: command word, e.g. ``train``.
        run: ``run(cfg, args) -> exit code | None``; ``cfg`` is ``None`` when ``config`` is ``None``.
        help: one-line description.
        config: config dataclass; adds ``--config FILE``, ``--set KEY=VALUE ...`` and ``--print-config``.
        arguments: adds verb-specific options to its parser.
        config_base: ``(cfg, args) -> mapping | None``; a mapping is layered between the defaults and
            the YAML file, and the config is resolved again (used to start from a run folder's saved config).
    """

    name: str
    run: VerbFn
    help: str
    config: type | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    config_base: ConfigBase | None = None


class Domain:
    """A named set of verbs with one command-line entry point."""

    def __init__(self, name: str, *, help: str) -> None:
        if not name.isidentifier():
            raise ValueError(f"Domain: name must be a Python identifier (the package name), got {name!r}")
        self.name = name
        self.help = help
        self._verbs: dict[str, Verb] = {}

    @property
    def verbs(self) -> dict[str, Verb]:
        """Registered verbs by name, in registration order."""
        return dict(self._verbs)

    def verb(
        self,
        name: str,
        *,
        help: str,
        config: type | None = None,
        arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        config_base: ConfigBase | None = None,
    ) -> Callable[[VerbFn], VerbFn]:
        """Decorator registering ``fn(cfg, args)`` as the verb ``name``; returns ``fn`` unchanged."""
        if name in self._verbs:
            raise ValueError(f"Domain {self.name!r}: verb {name!r} is already registered")
        if config is not None:
            if not is_config_class(config):
                raise ValueError(f"Domain {self.name!r}: config of verb {name!r} must be a dataclass type, got {config!r}")
            config()  # every field needs a default: fail at import, not at the user's command line

        def register(fn: VerbFn) -> VerbFn:
            self._verbs[name] = Verb(name, fn, help, config, arguments, config_base)
            return fn

        return register

    def _add_verb_arguments(self, parser: argparse.ArgumentParser, verb: Verb) -> None:
        if verb.arguments is not None:
            verb.arguments(parser)
        if verb.config is not None:
            g = parser.add_argument_group("configuration (defaults < --config < --set)")
            g.add_argument("--config", metavar="FILE", help="YAML file of config keys layered over the defaults")
            g.add_argument(
                "--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                help="override config keys, e.g. --set train.lr=3e-4 model.width=32",
            )
            g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
        parser.add_argument("--debug", action="store_true", help="show the traceback of user errors")

    def parser(self, prog: str | None = None) -> CliParser:
        """The domain's argument parser (verbs as subcommands)."""
        p = CliParser(prog=prog or f"python -m mz_pipelines.{self.name}", description=self.help)
        sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
        for verb in self._verbs.values():
            self._add_verb_arguments(sub.add_parser(verb.name, help=verb.help, description=verb.help), verb)
        return p

    def _resolve(self, verb: Verb, args: argparse.Namespace) -> Any:
        cfg = resolve_config(verb.config, yaml_path=args.config, overrides=args.set)
        if verb.config_base is not None:
            base = verb.config_base(cfg, args)
            if base is not None:
                cfg = resolve_config(verb.config, yaml_path=args.config, overrides=args.set, base=base)
        return cfg

    def _dispatch(self, argv: list[str], prog: str, verb_name: str | None) -> int:
        if verb_name is None:
            if argv and not argv[0].startswith("-") and argv[0] not in self._verbs:
                verbs = list(self._verbs)
                raise UserError(f"{prog}: unknown verb '{argv[0]}'{suggest(argv[0], verbs)}; expected one of {verbs}")
            args = self.parser(prog).parse_args(argv)
            verb = self._verbs[args.verb]
        else:
            if verb_name not in self._verbs:
                raise UserError(f"domain '{self.name}' has no '{verb_name}' verb")
            verb = self._verbs[verb_name]
            p = CliParser(prog=prog, description=verb.help)
            self._add_verb_arguments(p, verb)
            args = p.parse_args(argv)
            args.verb = verb_name
        cfg = None
        if verb.config is not None:
            cfg = self._resolve(verb, args)
            if args.print_config:
                print(dump_config(cfg), end="")
                return 0
        return int(verb.run(cfg, args) or 0)

    def main(self, argv: Sequence[str] | None = None, *, prog: str | None = None, verb: str | None = None) -> int:
        """Parse ``argv`` (default ``sys.argv[1:]``), run the verb, return the exit code.

        With ``verb`` given, ``argv`` holds only that verb's options (``mambazoo bench <domain>`` uses this).
        """
        args = list(sys.argv[1:] if argv is None else argv)
        name = prog or f"python -m mz_pipelines.{self.name}"
        return run_cli(lambda: self._dispatch(args, name, verb), debug=wants_debug(args))


def discover_domains() -> list[str]:
    """Names of the domain packages (``mz_pipelines/<name>/cli.py``), found without importing them."""
    import mz_pipelines

    names = set()
    for root in mz_pipelines.__path__:
        for entry in os.scandir(root):
            if (
                entry.is_dir()
                and entry.name.isidentifier()
                and not entry.name.startswith("_")
                and entry.name not in NOT_DOMAINS
                and os.path.isfile(os.path.join(entry.path, "cli.py"))
            ):
                names.add(entry.name)
    return sorted(names)


def load_domain(name: str) -> Domain:
    """Import ``mz_pipelines.<name>.cli`` and return its ``DOMAIN``.

    Raises:
        UserError: unknown domain (with a suggestion).
    """
    domains = discover_domains()
    if name not in domains:
        raise UserError(f"unknown domain '{name}'{suggest(name, domains)}; expected one of {domains}")
    module = importlib.import_module(f"mz_pipelines.{name}.cli")
    domain = getattr(module, "DOMAIN", None)
    if not isinstance(domain, Domain):
        raise TypeError(f"mz_pipelines.{name}.cli must define DOMAIN = Domain(...), got {type(domain).__name__}")
    return domain
