"""PNG training curves from ``metrics.jsonl`` records (matplotlib Agg canvas; pyplot is never imported)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import atomic_open

_SKIP = frozenset({"split", "step", "epoch", "lr", "elapsed_s"})


def _series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r.get("split") == split and isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def plot_curves(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``loss.png`` (train and val loss against step) and, when evaluation produced other
    metrics, ``metrics.png`` (one panel per metric). Returns the written paths.
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    written = []
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("val", "o-")):
        xs, ys = _series(records, split, "loss")
        if xs:
            ax.plot(xs, ys, style, label=f"{split} loss", markersize=3)
    if ax.lines:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        positive = all(y > 0 for line in ax.lines for y in line.get_ydata())
        ax.set_yscale("log" if positive else "linear")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.95)
        written.append(_save(fig, out / "loss.png"))

    names = sorted({k for r in records if r.get("split") == "val" for k in r if k not in _SKIP and k != "loss"})
    if names:
        fig = Figure(figsize=(4 * min(len(names), 3), 3.2 * ((len(names) + 2) // 3)))
        for i, name in enumerate(names):
            ax = fig.add_subplot((len(names) + 2) // 3, min(len(names), 3), i + 1)
            xs, ys = _series(records, "val", name)
            ax.plot(xs, ys, "o-", markersize=3)
            ax.set_title(f"val {name}")
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.9, wspace=0.35, hspace=0.6)
        written.append(_save(fig, out / "metrics.png"))
    return written
