"""The run folder ``runs/<domain>/<name>/`` and what lives in it.

::

    runs/<domain>/<name>/
        config.yaml      resolved config (defaults < --config < --set), reloadable with --config
        checkpoint.pt    last state: model, optimiser, scheduler, scaler, step, sampler position, RNG states
        best.pt          model weights at the best evaluation (train.monitor), with its metrics
        metrics.jsonl    one JSON object per logged train step and per evaluation
        summary.json     final state: steps, why training stopped, best and last metrics, timing
        figures/         loss.png, metrics.png
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import load_yaml
from .errors import UserError
from .schema import RunConfig


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder (nothing is created until :meth:`create`)."""

    path: Path

    @classmethod
    def for_config(cls, run: RunConfig, domain: str) -> RunDir:
        """``<run.root>/<domain>/<run.name>``."""
        return cls(Path(run.root) / domain / run.name)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def _run_files(self) -> list[Path]:
        return [self.config, self.checkpoint, self.best, self.metrics, self.summary]

    def has_run(self) -> bool:
        """``True`` when a previous training left a checkpoint or metrics here."""
        return self.checkpoint.exists() or self.metrics.exists()

    def check_start(self, *, resume: bool, overwrite: bool) -> None:
        """Validate a training start (read-only; every rank may call it).

        Raises:
            UserError: ``resume`` without a checkpoint, both flags, or an existing run without either flag.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if resume and not self.checkpoint.is_file():
            raise UserError(f"--resume: no checkpoint in {self.path} (nothing to resume; drop --resume to start)")
        if not resume and not overwrite and self.has_run():
            raise UserError(
                f"run folder {self.path} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another run.name"
            )

    def clear(self) -> None:
        """Delete the run files listed above (other files in the folder are left alone)."""
        for p in self._run_files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if self.figures.is_dir():
            shutil.rmtree(self.figures)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def trained_checkpoint(self, which: Literal["best", "last"] = "best") -> Path:
        """The checkpoint to evaluate or predict with: ``best.pt`` (falling back to ``checkpoint.pt``
        when the run had no evaluation) or ``checkpoint.pt`` for ``'last'``.

        Raises:
            UserError: the run folder has no checkpoint.
        """
        if which not in ("best", "last"):
            raise ValueError(f"trained_checkpoint: which must be one of ['best', 'last'], got {which!r}")
        if which == "best" and self.best.is_file():
            return self.best
        if self.checkpoint.is_file():
            return self.checkpoint
        raise UserError(f"no trained model in {self.path} (train first, or set run.root / run.name)")


def saved_config_base(
    domain: str, *, when: Callable[[argparse.Namespace], bool] | None = None
) -> Callable[[Any, argparse.Namespace], Mapping[str, Any] | None]:
    """A ``config_base`` hook for :meth:`Domain.verb`: start from the run folder's ``config.yaml``.

    The first resolution (defaults < --config < --set) locates the run folder through ``cfg.run``;
    if it holds a ``config.yaml`` (and ``when(args)`` is true), the config is resolved again as
    defaults < saved config < --config < --set. Used by ``train --resume``, ``evaluate`` and ``predict``.
    """

    def base(cfg: Any, args: argparse.Namespace) -> Mapping[str, Any] | None:
        if when is not None and not when(args):
            return None
        saved = RunDir.for_config(cfg.run, domain).config
        return load_yaml(saved) if saved.is_file() else None

    return base
