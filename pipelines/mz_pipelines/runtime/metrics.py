"""``metrics.jsonl``: one JSON object per line, e.g.
``{"split": "train", "step": 20, "epoch": 1, "loss": 0.31, "lr": 0.001, "elapsed_s": 4.2}`` or
``{"split": "val", "step": 50, "loss": 0.12, "r2": 0.97, ...}``.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import atomic_write_text


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # 'nan' / 'inf': keep each line valid JSON
    return v


class MetricsLogger:
    """Appends records to ``metrics.jsonl``; ``path=None`` (non-zero ranks) logs nothing."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)

    def log(self, split: str, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``{"split": split, "step": step, **values}`` and return it."""
        record = {"split": split, "step": step, **{k: _clean(v) for k, v in values.items()}}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run repeats the steps after its checkpoint)."""
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; a torn last line (crash mid-write) is skipped.

    Raises:
        UserError: missing file or a malformed line before the last.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"metrics file not found: {p}")
    lines = p.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{p}: line {i + 1} is not JSON") from None
    return out
