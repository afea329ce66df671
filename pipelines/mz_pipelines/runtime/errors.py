"""The error convention of every ``mambazoo`` command.

User mistakes (a missing file, a file in the wrong format, a bad option or config value) raise
:class:`UserError`. :func:`run_cli` turns one into a single ``error: ...`` line on stderr and exit
code 2; ``--debug`` adds the traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix (bad path, format, option or config value); exit code 2.

    The message is one line that names the problem, e.g.
    ``config file 'exp.yaml': unknown config key 'train.lr' (did you mean 'train.lr_max'?)``.
    """


def wants_debug(argv: Sequence[str]) -> bool:
    """``True`` when ``--debug`` is among the arguments (checked before parsing, so parse errors obey it too)."""
    return "--debug" in argv


def _is_main_rank() -> bool:
    # Under torchrun every rank hits the same user error; one line is enough.
    return os.environ.get("RANK", "0") == "0"


def run_cli(body: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command body and map its outcome to an exit code.

    Returns the body's code (``None`` means 0); 2 after a :class:`UserError` or a missing third-party
    module (one ``error:`` line on stderr, plus the traceback when ``debug``); 130 after Ctrl-C.
    Other exceptions are bugs and propagate with their traceback.
    """
    try:
        return int(body() or 0)
    except UserError as e:
        if _is_main_rank():
            if debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as e:
        if not e.name or e.name.split(".")[0].startswith("mz_"):
            raise  # our own package is broken: a bug, keep the traceback
        if _is_main_rank():
            if debug:
                traceback.print_exc()
            print(
                f"error: missing optional dependency '{e.name.split('.')[0]}' "
                "(install the matching extra, e.g. pip install 'mambazoo[medseg]')",
                file=sys.stderr,
            )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def require_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` as a :class:`Path` if it is an existing file; otherwise ``UserError`` naming ``what``."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    return p


def require_dir(path: str | os.PathLike[str], what: str = "folder") -> Path:
    """``path`` as a :class:`Path` if it is an existing folder; otherwise ``UserError`` naming ``what``."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} is not a folder: {p}")
    return p
