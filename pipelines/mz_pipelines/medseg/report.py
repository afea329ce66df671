"""Evaluation outputs: per-case CSV, summary JSON and a per-class Dice/HD95 figure, written atomically."""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mz_pipelines.runtime.files import atomic_open, atomic_write_text, write_json

CSV_COLUMNS = ("case", "class", "class_name", "dice", "hd95_mm", "assd_mm", "pred_empty", "label_empty")


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        out = []
        for key in CSV_COLUMNS:
            v = r.get(key, r["class"] if key == "class_name" else None)
            if isinstance(v, (bool, np.bool_)):
                v = int(v)
            elif isinstance(v, (float, np.floating)):
                v = repr(float(v))  # full precision; NaN is written as "nan"
            out.append(v)
        w.writerow(out)
    return buf.getvalue()


def _figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = sorted({int(r["class"]) for r in rows})
    names = {int(r["class"]): str(r.get("class_name", r["class"])) for r in rows}
    panels = [("dice", "Dice"), ("hd95_mm", "HD95 (mm)")]
    rng = np.random.default_rng(0)  # fixed jitter: the same rows give the same picture
    fig = Figure(figsize=(3.2 + 1.1 * len(classes) * len(panels), 3.6))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        data = [np.asarray([float(r[key]) for r in rows if int(r["class"]) == c], dtype=np.float64) for c in classes]
        finite = [d[np.isfinite(d)] for d in data]
        ax.boxplot(finite, showfliers=False, widths=0.5)
        for j, d in enumerate(finite):
            ax.plot(j + 1 + rng.uniform(-0.12, 0.12, d.size), d, "o", markersize=3, alpha=0.6, color="tab:blue")
        ax.set_xticks(range(1, len(classes) + 1), [names[c] for c in classes], rotation=30 if len(classes) > 4 else 0)
        n_nan = sum(int((~np.isfinite(d)).sum()) for d in data)
        ax.set_title(title + (f" ({n_nan} undefined)" if n_nan else ""), fontsize=10)
        if key == "dice":
            ax.set_ylim(-0.03, 1.03)
        ax.grid(True, axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.18, top=0.88, wspace=0.3)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def write_metrics(
    rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write ``metrics_per_case.csv``, ``summary.json`` and ``metrics.png`` into ``out_dir``.

    Args:
        rows: :func:`~mz_pipelines.medseg.metrics.case_metrics` rows, each with a ``"case"`` key
            added by the caller (``class_name`` defaults to the class value).
        summary: :func:`~mz_pipelines.medseg.metrics.summarize` output (NaN is written as ``null``).
        out_dir: folder, created if missing.

    Returns:
        The written paths: CSV (columns :data:`CSV_COLUMNS`, NaN as ``nan``), JSON, PNG (per-class
        box and strip plots of Dice and of finite HD95 values).
    """
    if not rows:
        raise ValueError("write_metrics: rows must be a non-empty list of case_metrics rows, got none")
    for key in ("case", "class", "dice", "hd95_mm", "assd_mm", "pred_empty", "label_empty"):
        if key not in rows[0]:
            raise ValueError(
                f"write_metrics: rows must carry {key!r} (case_metrics rows plus 'case'), got keys {sorted(rows[0])}"
            )
    out = Path(out_dir)
    csv_path = atomic_write_text(out / "metrics_per_case.csv", _csv_text(rows))
    json_path = write_json(out / "summary.json", _json_safe(summary))
    png_path = _figure(rows, out / "metrics.png")
    return [csv_path, json_path, png_path]
