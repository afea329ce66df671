"""Pieces every domain's verbs share: the ``train`` arguments and call, the ``--checkpoint`` choice.

Torch-free at import (the engine loads inside :func:`run_train`), so ``--help`` stays fast.

Examples:
    >>> @DOMAIN.verb("train", config=MyConfig, arguments=add_train_arguments,
    ...              config_base=saved_config_base(NAME, when=lambda a: a.resume))
    ... def train(cfg, args):
    ...     return run_train(lambda: build_task(cfg), cfg, args, NAME)
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from .errors import UserError
from .rundir import RunDir


def is_main_process() -> bool:
    """``True`` outside torchrun and on rank 0 (the process that prints)."""
    return os.environ.get("RANK", "0") == "0"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``--resume`` | ``--overwrite`` and ``--stop-after N``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in runs/<domain>/<run.name> from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument(
        "--stop-after", type=int, default=0, metavar="N", help="stop after step N as if interrupted (continue with --resume)"
    )


def add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    """``--checkpoint best|last`` (see :meth:`RunDir.trained_checkpoint`)."""
    p.add_argument(
        "--checkpoint", choices=["best", "last"], default="best",
        help="best.pt (default; falls back to checkpoint.pt) or checkpoint.pt",
    )


def run_train(task_factory: Callable[[], Any], cfg: Any, args: argparse.Namespace, domain: str) -> int:
    """Train ``cfg`` (with ``train`` and ``run`` sections) through the engine into
    ``runs/<domain>/<run.name>``, honouring the arguments of :func:`add_train_arguments`."""
    if args.stop_after < 0:
        raise UserError(f"--stop-after must be >= 0, got {args.stop_after}")
    from .engine import train

    result = train(
        task_factory,
        cfg.train,
        run_dir=RunDir.for_config(cfg.run, domain),
        config=cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after=args.stop_after,
        quiet=args.quiet,
    )
    if is_main_process():
        print(result.describe())
    return 0
