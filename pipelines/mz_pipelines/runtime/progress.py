"""Training progress: a tqdm bar with ETA on a terminal, plain ``step i/n ... eta`` lines otherwise."""
from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """``'1:02:03'`` / ``'2:03'``."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress over optimiser steps ``initial..total``.

    Args:
        enabled: ``False`` (``--quiet``, or a rank other than 0) shows nothing.
        stream: where to draw; a bar when it is a TTY, one line per :meth:`log` call otherwise.
    """

    def __init__(
        self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = "train", stream: IO[str] | None = None
    ) -> None:
        self.total, self.initial, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True) if tty else None
        self._t0 = time.perf_counter()
        self._step = initial

    def eta_seconds(self) -> float | None:
        """Remaining time extrapolated from the steps done in this process, or ``None`` before the first."""
        done = self._step - self.initial
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * (self.total - self._step)

    def advance(self, step: int) -> None:
        """Now at ``step``."""
        if self._bar is not None:
            self._bar.update(step - self._step)
        self._step = step

    def log(self, values: Mapping[str, float]) -> None:
        """Show the latest values: bar postfix on a TTY, else one line with the ETA."""
        if not self.enabled:
            return
        text = {k: f"{v:.4g}" for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
            return
        eta = self.eta_seconds()
        parts = " ".join(f"{k} {v}" for k, v in text.items())
        tail = f" eta {format_duration(eta)}" if eta is not None else ""
        print(f"{self.desc} step {self._step}/{self.total} {parts}{tail}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
