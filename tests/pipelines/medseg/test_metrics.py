"""Dice/HD95/ASSD against hand-computable geometry and a brute-force surface-distance reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("monai")
from scipy.ndimage import binary_erosion  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402

from mz_pipelines.medseg.metrics import EMPTY_POLICY, case_metrics, dice, summarize  # noqa: E402


def _box(shape, lo, hi, value=1):
    m = np.zeros(shape, dtype=np.int64)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return m


def _shifted(lo, hi, axis, k):
    lo2, hi2 = list(lo), list(hi)
    lo2[axis] += k
    hi2[axis] += k
    return lo2, hi2


@pytest.mark.parametrize("k", [0, 1, 3, 7], ids=lambda k: f"shift{k}")
def test_dice_of_shifted_boxes_is_one_minus_shift_over_side(k):
    lo, hi = (3, 4, 5), (11, 10, 9)  # side 8 along axis 0
    a = _box((19, 17, 15), lo, hi)
    b = _box((19, 17, 15), *_shifted(lo, hi, 0, k))
    assert dice(a == 1, b == 1) == pytest.approx(1 - k / 8)
    assert case_metrics(a, b, classes=[1], spacing=None)[0]["dice"] == pytest.approx(1 - k / 8)


def test_dice_helper_edge_cases():
    z = np.zeros((5, 7), dtype=bool)
    assert dice(z, z) == 1.0
    one = z.copy()
    one[2, 3] = True
    assert dice(one, z) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        dice(z, np.zeros((7, 5), dtype=bool))


def test_identical_masks_score_perfectly():
    rng = np.random.default_rng(0)
    m = (rng.random((13, 11, 9)) > 0.6).astype(np.int64) * 2
    (row,) = case_metrics(m, m.copy(), classes=[2], spacing=(0.7, 1.3, 2.9))
    assert row["dice"] == 1.0 and row["hd95_mm"] == 0.0 and row["assd_mm"] == 0.0
    assert not row["pred_empty"] and not row["label_empty"]


@pytest.mark.parametrize("axis", [0, 1, 2], ids=lambda a: f"axis{a}")
@pytest.mark.parametrize("k", [1, 4], ids=lambda k: f"k{k}")
def test_parallel_planes_distance_is_shift_times_spacing(axis, k):
    # One-voxel slabs across the whole volume: every surface voxel is exactly k*s from the other slab.
    spacing = (0.8, 1.5, 3.0)
    shape = (11, 12, 13)
    a, b = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    idx_a, idx_b = [slice(None)] * 3, [slice(None)] * 3
    idx_a[axis], idx_b[axis] = 2, 2 + k
    a[tuple(idx_a)] = 1
    b[tuple(idx_b)] = 1
    (row,) = case_metrics(a, b, classes=[1], spacing=spacing)
    assert row["dice"] == 0.0
    assert row["hd95_mm"] == pytest.approx(k * spacing[axis])
    assert row["assd_mm"] == pytest.approx(k * spacing[axis])


@pytest.mark.parametrize("axis", [0, 2], ids=lambda a: f"axis{a}")
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"k{k}")
def test_shifted_cubes_hd95_is_shift_times_spacing(axis, k):
    # A cube moved by k voxels: each surface voxel is at most k*s from the moved surface and the whole
    # trailing face (64 of 296 surface voxels, > 5%) is exactly k*s away, so the 95th percentile is k*s.
    spacing = (2.0, 1.0, 0.5)
    lo, hi = (4, 5, 6), (12, 13, 14)
    a = _box((20, 21, 22), lo, hi)
    b = _box((20, 21, 22), *_shifted(lo, hi, axis, k))
    (row,) = case_metrics(a, b, classes=[1], spacing=spacing)
    assert row["hd95_mm"] == pytest.approx(k * spacing[axis])
    assert 0 < row["assd_mm"] < k * spacing[axis]


def test_2d_squares_anisotropic():
    spacing = (0.5, 3.0)
    a = _box((25, 23), (5, 6), (15, 16))
    b = _box((25, 23), (5, 8), (15, 18))  # shifted by 2 along axis 1 (3 mm pixels)
    (row,) = case_metrics(a, b, classes=[1], spacing=spacing)
    assert row["dice"] == pytest.approx(1 - 2 / 10)
    assert row["hd95_mm"] == pytest.approx(6.0)


def _reference(p, t, spacing):
    """Brute force: surfaces by erosion (cross), all pairwise mm distances, directed 95th percentiles."""
    def surface_mm(m):
        pts = np.argwhere(m & ~binary_erosion(m)).astype(np.float64)
        return pts * np.asarray(spacing)

    sp, st = surface_mm(p), surface_mm(t)
    d = cdist(sp, st)
    d_pt, d_tp = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    assd = np.concatenate([d_pt, d_tp]).mean()
    return hd95, assd


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
def test_distances_match_brute_force_reference_on_random_blobs(seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    spacing = (1.0, 0.6, 2.5)
    shape = (17, 19, 13)
    pred = (gaussian_filter(rng.standard_normal(shape), 2.0) > 0.05).astype(np.int64)
    label = (gaussian_filter(rng.standard_normal(shape), 2.0) > 0.05).astype(np.int64) * 3
    (row,) = case_metrics(np.where(pred == 1, 3, 0), label, classes=[3], spacing=spacing)
    hd95, assd = _reference(pred == 1, label == 3, spacing)
    assert row["hd95_mm"] == pytest.approx(hd95, rel=1e-5)
    assert row["assd_mm"] == pytest.approx(assd, rel=1e-5)


def test_empty_policy_rows():
    shape = (9, 10, 11)
    pred = _box(shape, (1, 1, 1), (4, 4, 4), 1)  # class 1 only in pred
    label = _box(shape, (5, 5, 5), (8, 8, 8), 2)  # class 2 only in label; class 3 nowhere
    rows = case_metrics(pred, label, classes=[1, 2, 3], spacing=(1.0, 1.0, 1.0), names={1: "a", 2: "b"})
    r1, r2, r3 = rows
    assert [r["class_name"] for r in rows] == ["a", "b", "3"]
    assert (r1["pred_empty"], r1["label_empty"]) == (False, True)
    assert (r2["pred_empty"], r2["label_empty"]) == (True, False)
    for r in (r1, r2):
        assert r["dice"] == 0.0 and math.isnan(r["hd95_mm"]) and math.isnan(r["assd_mm"])
    assert (r3["dice"], r3["hd95_mm"], r3["assd_mm"]) == (1.0, 0.0, 0.0)
    assert r3["pred_empty"] and r3["label_empty"]
    assert "both" in EMPTY_POLICY and "NaN" in EMPTY_POLICY


def test_float_label_with_whole_values_is_accepted():
    label = _box((9, 8, 7), (1, 1, 1), (5, 5, 5)).astype(np.float32)
    (row,) = case_metrics(label.astype(np.int64), label, classes=[1], spacing=None)
    assert row["dice"] == 1.0


def test_summarize_nan_aware_means_and_counts():
    def row(case, c, d, h, a, pe=False, le=False):
        return {"case": case, "class": c, "class_name": f"c{c}", "dice": d, "hd95_mm": h, "assd_mm": a,
                "pred_empty": pe, "label_empty": le}

    nan = math.nan
    rows = [
        row("x", 1, 1.0, 0.0, 0.0, True, True),
        row("y", 1, 0.5, 2.0, 1.0),
        row("z", 1, 0.0, nan, nan, True, False),
        row("x", 2, 0.8, 4.0, 2.0),
        row("y", 2, 0.6, 6.0, 3.0),
        row("z", 2, 0.0, nan, nan, False, True),
    ]
    s = summarize(rows)
    assert s["n_cases"] == 3 and s["empty_policy"] == EMPTY_POLICY
    c1, c2 = s["per_class"]["1"], s["per_class"]["2"]
    assert c1["class_name"] == "c1" and c1["n"] == 3
    assert c1["dice_mean"] == pytest.approx(0.5) and c1["dice_std"] == pytest.approx(0.5)
    assert c1["hd95_mm_mean"] == pytest.approx(1.0) and c1["hd95_mm_n"] == 2
    assert c1["assd_mm_mean"] == pytest.approx(0.5) and c1["assd_mm_std"] == pytest.approx(math.sqrt(0.5))
    assert (c1["n_one_empty"], c1["n_both_empty"]) == (1, 1)
    assert (c2["n_one_empty"], c2["n_both_empty"]) == (1, 0)
    assert c2["dice_mean"] == pytest.approx(1.4 / 3) and c2["hd95_mm_mean"] == pytest.approx(5.0)
    fg = s["foreground"]
    assert fg["dice_mean"] == pytest.approx((0.5 + 1.4 / 3) / 2)
    assert fg["hd95_mm_mean"] == pytest.approx(3.0)
    assert (fg["n_one_empty"], fg["n_both_empty"]) == (2, 1)


def test_summarize_all_nan_distances_give_none():
    rows = [{"class": 1, "dice": 0.0, "hd95_mm": math.nan, "assd_mm": math.nan, "pred_empty": True, "label_empty": False}]
    c = summarize(rows)["per_class"]["1"]
    assert c["hd95_mm_mean"] is None and c["hd95_mm_n"] == 0 and c["dice_std"] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pred=np.zeros((4, 5, 6), np.int64), label=np.zeros((4, 5, 7), np.int64)), "same shape"),
        (dict(pred=np.full((4, 5, 6), 0.5, np.float32), label=np.zeros((4, 5, 6), np.int64)), "integer class values"),
        (dict(pred=np.zeros((4,), np.int64), label=np.zeros((4,), np.int64)), "2 or 3 spatial dims"),
        (dict(spacing=(1.0, 1.0)), "spacing"),
        (dict(spacing=(1.0, -1.0, 1.0)), "spacing"),
        (dict(classes=[]), "classes"),
        (dict(classes=[1, 1]), "distinct"),
    ],
    ids=["shape-mismatch", "fractional", "1d", "spacing-len", "spacing-neg", "no-classes", "dup-classes"],
)
def test_case_metrics_rejects_bad_input(kwargs, match):
    args = dict(pred=np.zeros((4, 5, 6), np.int64), label=np.zeros((4, 5, 6), np.int64), classes=[1], spacing=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        case_metrics(args.pop("pred"), args.pop("label"), **args)


def test_summarize_rejects_bad_rows():
    with pytest.raises(ValueError, match="non-empty"):
        summarize([])
    with pytest.raises(ValueError, match="missing keys"):
        summarize([{"class": 1, "dice": 1.0}])


def test_write_metrics_round_trip(tmp_path):
    import csv
    import json

    from mz_pipelines.medseg.report import CSV_COLUMNS, write_metrics

    shape = (12, 11, 10)
    label = _box(shape, (2, 2, 2), (7, 7, 7), 1) + _box(shape, (8, 8, 8), (11, 10, 9), 2)
    pred_a = _box(shape, (3, 2, 2), (8, 7, 7), 1)  # class 1 shifted by one voxel, class 2 missed
    rows = []
    for case, pred in (("a", pred_a), ("b", label.copy())):
        for r in case_metrics(pred, label, classes=[1, 2], spacing=(1.0, 1.0, 2.0), names={1: "liver", 2: "tumour"}):
            rows.append({"case": case, **r})
    summary = summarize(rows)
    paths = write_metrics(rows, summary, tmp_path / "eval")
    assert [p.name for p in paths] == ["metrics_per_case.csv", "summary.json", "metrics.png"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(p.name for p in paths)  # no temp files

    with open(paths[0], newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS and len(table) == 4
    a2 = next(r for r in table if r["case"] == "a" and r["class"] == "2")
    assert a2["class_name"] == "tumour" and float(a2["dice"]) == 0.0 and math.isnan(float(a2["hd95_mm"]))
    assert (a2["pred_empty"], a2["label_empty"]) == ("1", "0")
    a1 = next(r for r in table if r["case"] == "a" and r["class"] == "1")
    assert float(a1["dice"]) == pytest.approx(rows[0]["dice"]) == pytest.approx(0.8)

    def no_nan(token):
        raise AssertionError(f"non-finite {token} in summary.json")

    loaded = json.loads(paths[1].read_text(), parse_constant=no_nan)
    assert loaded["per_class"]["2"]["n_one_empty"] == 1 and loaded["per_class"]["2"]["hd95_mm_std"] is None
    assert loaded["foreground"]["dice_mean"] == pytest.approx(summary["foreground"]["dice_mean"])
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 2000


def test_write_metrics_needs_case_key(tmp_path):
    from mz_pipelines.medseg.report import write_metrics

    rows = case_metrics(np.ones((4, 4), np.int64), np.ones((4, 4), np.int64), classes=[1], spacing=None)
    with pytest.raises(ValueError, match="'case'"):
        write_metrics(rows, summarize(rows), tmp_path)
