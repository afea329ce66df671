"""Per-case, per-class segmentation metrics (Dice, HD95 and ASSD in mm) and their summary.

Distances come from MONAI (``compute_hausdorff_distance`` with ``percentile=95``,
``compute_average_surface_distance`` with ``symmetric=True``), measured between surface voxels
(a mask minus its erosion by the face-connected cross) at voxel centres, in millimetres with the
voxel ``spacing`` applied per axis. Conventions, which differ between tools:

- HD95 (MONAI): the 95th percentile (``torch.quantile``, linear interpolation) of each *directed*
  set of surface distances, pred->label and label->pred, and the larger of the two. medpy's
  ``hd95`` (used by SegMamba's scripts) takes the percentile of the union of both sets instead, so
  the two can differ slightly on asymmetric errors; both equal ``k * s`` for a shift of ``k``
  voxels of spacing ``s`` along one axis.
- ASSD: the mean of the union of both directed distance sets.

See :data:`EMPTY_POLICY` for masks with no voxels of a class.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EMPTY_POLICY = (
    "both pred and label empty for a class: dice 1, hd95 0, assd 0 (counted in n_both_empty); "
    "exactly one empty: dice 0, hd95 NaN, assd NaN (counted in n_one_empty; NaNs are left out of the "
    "distance means, so read hd95/assd together with n_one_empty)"
)
"""How a class absent from the prediction and/or the label is scored (one line, also written to summary.json).

SegMamba's metric script gives Dice 0 / HD95 50 whenever either mask is empty, even both; MONAI's
``DiceMetric(ignore_empty=True)`` gives NaN when the label is empty. We score a correct "nothing
here" as perfect and keep distances of a missed/hallucinated structure undefined but counted.
"""

METRIC_KEYS = ("dice", "hd95_mm", "assd_mm")


def _as_mask(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"case_metrics: {name} must be a numpy array [*S] of ints, got {type(a).__name__}")
    if a.ndim not in (2, 3):
        raise ValueError(f"case_metrics: {name} must have 2 or 3 spatial dims, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and np.array_equal(a, np.round(a)):
        return a.astype(np.int64)  # MONAI loads label maps as float; whole values are fine
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"case_metrics: {name} must hold integer class values, got dtype {a.dtype} with fractions")
    return a


def _check_spacing(spacing: object, ndim: int) -> list[float]:
    if spacing is None:
        return [1.0] * ndim
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, (Sequence, np.ndarray)):
        raise ValueError(f"case_metrics: spacing must be None or {ndim} positive numbers (mm), got {spacing!r}")
    vals = [float(s) for s in spacing]
    if len(vals) != ndim or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"case_metrics: spacing must be None or {ndim} positive numbers (mm), got {list(spacing)}")
    return vals


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice ``2|P & L| / (|P| + |L|)`` of two boolean masks ``[*S]``; 1.0 when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"dice: pred and label must have the same shape, got {p.shape} and {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom


def surface_distances_mm(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """``(hd95, assd)`` in mm of two non-empty boolean masks ``[*S]`` (MONAI; see the module docstring)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=bool))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(label, dtype=bool))[None, None]
    if not p.any() or not t.any():
        raise ValueError(
            f"surface_distances_mm: pred and label must both be non-empty, got {int(p.sum())} and {int(t.sum())} voxels"
        )
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI 1.5-1.6 warns about its own internal call to get_mask_edges
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=sp)
        assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=sp)
    return float(hd95.item()), float(assd.item())


def case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    classes: Sequence[int],
    spacing: Sequence[float] | None,
    names: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """Dice, HD95 and ASSD of one case, one row per class, with :data:`EMPTY_POLICY` applied.

    Args:
        pred: ``[*S]`` integer mask (class index per voxel), ``S`` 2D or 3D; float arrays holding
            whole numbers are accepted.
        label: ``[*S]`` integer mask of the same shape.
        classes: class values to score (usually the foreground ones, ``1..K-1``).
        spacing: voxel size in mm per axis of ``S``; ``None`` measures distances in voxels.
        names: optional class value -> name for the ``class_name`` column (default ``str(value)``).

    Returns:
        ``[{"class", "class_name", "dice", "hd95_mm", "assd_mm", "pred_empty", "label_empty"}, ...]``
        in the order of ``classes``; the caller adds ``"case"``.

    Examples:
        >>> rows = case_metrics(pred, label, classes=[1, 2], spacing=(1.0, 1.0, 2.5))
        >>> rows[0]["dice"], rows[0]["hd95_mm"]
    """
    pred, label = _as_mask("pred", pred), _as_mask("label", label)
    if pred.shape != label.shape:
        raise ValueError(f"case_metrics: pred and label must have the same shape, got {pred.shape} and {label.shape}")
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise ValueError(f"case_metrics: classes must be a non-empty sequence of ints, got {classes!r}")
    not_int = any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in classes)
    if not_int or len(set(classes)) != len(classes):
        raise ValueError(f"case_metrics: classes must be distinct ints, got {list(classes)}")
    sp = _check_spacing(spacing, pred.ndim)
    rows = []
    for c in classes:
        p, t = pred == c, label == c
        p_empty, t_empty = not p.any(), not t.any()
        if p_empty and t_empty:
            d, hd95, assd = 1.0, 0.0, 0.0
        elif p_empty or t_empty:
            d, hd95, assd = 0.0, math.nan, math.nan
        else:
            d = dice(p, t)
            hd95, assd = surface_distances_mm(p, t, sp)
        rows.append({
            "class": int(c),
            "class_name": (names or {}).get(int(c), str(int(c))),
            "dice": d,
            "hd95_mm": hd95,
            "assd_mm": assd,
            "pred_empty": p_empty,
            "label_empty": t_empty,
        })
    return rows


def _stats(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """nan-aware (mean, sample std, n finite); ``None`` where undefined (JSON ``null``)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`case_metrics` rows (of many cases) per class and over foreground classes.

    Returns:
        ``{"empty_policy", "n_cases", "per_class": {"<class>": {"class_name", "n", "dice_mean",
        "dice_std", "hd95_mm_mean", "hd95_mm_std", "hd95_mm_n", "assd_mm_mean", "assd_mm_std",
        "assd_mm_n", "n_one_empty", "n_both_empty"}}, "foreground": {"dice_mean", "hd95_mm_mean",
        "assd_mm_mean", "n_one_empty", "n_both_empty"}}``. Means/stds skip NaN (``*_n`` counts the
        values used; std is the sample std, ``None`` below 2 values). ``foreground`` averages the
        per-class means of classes other than 0.
    """
    if not rows:
        raise ValueError("summarize: rows must be a non-empty list of case_metrics rows, got none")
    missing = {"class", *METRIC_KEYS, "pred_empty", "label_empty"} - set(rows[0])
    if missing:
        raise ValueError(f"summarize: rows must be case_metrics rows, missing keys {sorted(missing)}")
    by_class: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_class.setdefault(int(r["class"]), []).append(r)
    per_class: dict[str, dict[str, Any]] = {}
    for c in sorted(by_class):
        rs = by_class[c]
        entry: dict[str, Any] = {"class_name": str(rs[0].get("class_name", c)), "n": len(rs)}
        for key in METRIC_KEYS:
            mean, std, n = _stats([float(r[key]) for r in rs])
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean, std
            if key != "dice":
                entry[f"{key}_n"] = n
        entry["n_one_empty"] = sum(bool(r["pred_empty"]) != bool(r["label_empty"]) for r in rs)
        entry["n_both_empty"] = sum(bool(r["pred_empty"]) and bool(r["label_empty"]) for r in rs)
        per_class[str(c)] = entry
    fg = [e for c, e in per_class.items() if c != "0"] or list(per_class.values())
    foreground: dict[str, Any] = {}
    for key in METRIC_KEYS:
        means = [e[f"{key}_mean"] for e in fg if e[f"{key}_mean"] is not None]
        foreground[f"{key}_mean"] = float(np.mean(means)) if means else None
    foreground["n_one_empty"] = sum(e["n_one_empty"] for e in fg)
    foreground["n_both_empty"] = sum(e["n_both_empty"] for e in fg)
    cases = {r["case"] for r in rows if "case" in r}
    return {
        "empty_policy": EMPTY_POLICY,
        "n_cases": len(cases) if cases else max(len(v) for v in by_class.values()),
        "per_class": per_class,
        "foreground": foreground,
    }
