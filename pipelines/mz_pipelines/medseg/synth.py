"""A synthetic Decathlon/nnU-Net-style segmentation task whose labels intensity cannot give away.

Each volume holds objects of up to three shape families, drawn in world (mm) space so that spheres
stay round under anisotropic voxels and flipped affines:

==========  ==========================  ==========================
family      3D                          2D
==========  ==========================  ==========================
round       spheres and ellipsoids      discs and ellipses
box         axis-aligned cubes          axis-aligned squares
rod         thin axis-aligned cylinders thin axis-aligned bars
==========  ==========================  ==========================

``classes=k`` labels the first ``k`` families ``1..k``; with ``k < 3`` rods are drawn as
*unlabeled distractors*. Every object's contrast comes from one distribution whatever its family,
so only shape and context tell the classes apart. On top: a smooth additive bias field, a per-case
offset and Gaussian noise whose sigma is ``noise * NOISE_UNIT`` times the mean object contrast
(``NOISE_UNIT = 0.8``: the default ``noise=1`` is a voxel SNR of 1.25, tuned so that a small U-Net
learns the task in a few CPU minutes while the best global threshold stays below 0.3 Dice).

The folder written by :func:`write_task`::

    dataset.json
    imagesTr/<case>_0000.nii.gz  labelsTr/<case>.nii.gz   (training and validation cases)
    imagesTs/<case>_0000.nii.gz  labelsTs/<case>.nii.gz   (held-out test cases)

Validation and test volumes are larger than training volumes (``4/3`` of ``size`` by default), so
evaluation exercises sliding-window inference over several patches.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mz_kernels._validate import check_choice, check_positive_int
from mz_pipelines.runtime.files import write_json

AFFINES = ("identity", "aniso", "flip")
FAMILIES = {3: ("sphere", "cube", "rod"), 2: ("disc", "square", "bar")}
MAX_CLASSES = 3

# Object radius in units of the geometric-mean voxel size, objects per (48 voxels)^d and contrast range.
RADIUS = (6.0, 10.0)
LABELED_PER_VOLUME = (1, 3)
DISTRACTORS_PER_VOLUME = (1, 3)
CONTRAST = (0.7, 1.3)
NOISE_UNIT = 0.8  # noise=1 means a Gaussian sigma of 0.8 x the mean object contrast
BIAS_AMPLITUDE = 0.35
OFFSET = 0.25


def geometry(kind: str, spatial_dims: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """The ``[4, 4]`` affine of every volume and its voxel size for an ``affine`` kind.

    ``identity``: 1 mm voxels at the origin; ``aniso``: 0.8 x 0.8 x 1.5 mm (2D: 0.8 x 1.2) with an
    offset origin; ``flip``: as ``aniso`` with the first (and in 3D also the last) axis negated, so
    the stored array is mirrored relative to RAS.
    """
    check_choice("synth.geometry", "affine", kind, AFFINES)
    spacing = (1.0,) * spatial_dims if kind == "identity" else ((0.8, 0.8, 1.5) if spatial_dims == 3 else (0.8, 1.2))
    aff = np.eye(4)
    for i, s in enumerate(spacing):
        aff[i, i] = s
    if kind != "identity":
        aff[:3, 3] = (-21.5, 13.25, -7.0)
    if kind == "flip":
        for axis in (0, 2) if spatial_dims == 3 else (0,):
            aff[axis, axis] = -aff[axis, axis]
    return aff, spacing


def _world_grid(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of every voxel, ``[d, *shape]``."""
    d = len(shape)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    lin = affine[:d, :d].astype(np.float32)
    return np.einsum("ij,j...->i...", lin, idx) + affine[:d, 3].astype(np.float32).reshape(d, *([1] * d))


def _shape_mask(family: int, grid: np.ndarray, center: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of one object of ``family`` (0 round, 1 box, 2 rod) centred at ``center`` (mm)."""
    d = grid.shape[0]
    rel = grid - center.reshape(d, *([1] * d)).astype(np.float32)
    if family == 0:  # sphere / disc, or an ellipsoid / ellipse with axes in [0.75 r, r]
        axes = np.full(d, r) if rng.random() < 0.5 else r * rng.uniform(0.75, 1.0, size=d)
        return np.sum((rel / axes.reshape(d, *([1] * d)).astype(np.float32)) ** 2, axis=0) <= 1.0
    if family == 1:  # cube / square with about the volume of a sphere of radius r
        return np.max(np.abs(rel), axis=0) <= 0.8 * r
    # rod: radius 0.3 r (3D: round cross-section, 2D: a bar) and half-length 2.2 r along a random axis
    axis = int(rng.integers(d))
    cross = np.sum(np.delete(rel, axis, axis=0) ** 2, axis=0) <= (0.3 * r) ** 2
    return cross & (np.abs(rel[axis]) <= 2.2 * r)


def _bounding_radius(family: int, r: float) -> float:
    return r * (1.0, 0.8 * np.sqrt(3), 2.25)[family]


def _bias_field(grid: np.ndarray, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth additive field of amplitude about ``BIAS_AMPLITUDE``: a few long-wavelength cosines."""
    d = grid.shape[0]
    field = np.zeros(grid.shape[1:], dtype=np.float32)
    for _ in range(3):
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        wavelength = extent * rng.uniform(0.8, 2.0)
        phase = rng.uniform(0, 2 * np.pi)
        proj = np.einsum("i,i...->...", direction.astype(np.float32), grid)
        field += np.cos(2 * np.pi * proj / wavelength + phase).astype(np.float32)
    return (BIAS_AMPLITUDE / 3.0) * field


def make_case(
    shape: Sequence[int],
    *,
    affine: np.ndarray,
    classes: int = 1,
    noise: float = 1.0,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume: image ``[*shape]`` float32 and label ``[*shape]`` uint8 (values ``0..classes``).

    Objects are placed without overlap inside the volume; the first family is always present.
    """
    d = len(shape)
    spacing = np.linalg.norm(affine[:3, :d], axis=0)
    unit = float(np.prod(spacing) ** (1.0 / d))
    grid = _world_grid(shape, affine)
    lo = grid.reshape(d, -1).min(axis=1)
    hi = grid.reshape(d, -1).max(axis=1)
    scale = float(np.prod(shape)) / 48.0**d  # object counts grow with the volume

    objects: list[tuple[int, int]] = []  # (family, label)
    families = list(range(classes)) + ([MAX_CLASSES - 1] if classes < MAX_CLASSES else [])
    for family in families:
        labeled = family < classes
        low, high = LABELED_PER_VOLUME if labeled else DISTRACTORS_PER_VOLUME
        n = max(1 if family == 0 else 0, int(round(rng.integers(low, high + 1) * scale)))
        objects += [(family, family + 1 if labeled else 0)] * n
    # labeled objects first (random order within each group), so a crowded volume drops distractors
    order = sorted(rng.permutation(len(objects)), key=lambda i: objects[i][1] == 0)

    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    placed: list[tuple[np.ndarray, float]] = []
    for i in order:
        family, value = objects[i]
        r = unit * rng.uniform(*RADIUS)
        reach = _bounding_radius(family, r)
        for _ in range(100):
            center = rng.uniform(lo + reach, hi - reach) if np.all(hi - lo > 2 * reach) else (lo + hi) / 2
            if all(np.linalg.norm(center - c) > reach + rc + 2 * unit for c, rc in placed):
                break
        else:
            continue  # no room left for this object
        placed.append((center, reach))
        mask = _shape_mask(family, grid, center, r, rng)
        image[mask] = rng.uniform(*CONTRAST)
        label[mask] = value
    extent = float(np.max(hi - lo))
    image += _bias_field(grid, extent, rng) + rng.uniform(-OFFSET, OFFSET)
    image += rng.normal(0.0, NOISE_UNIT * noise, size=shape).astype(np.float32)
    return image, label


def _sizes(size: int | Sequence[int], spatial_dims: int, what: str) -> tuple[int, ...]:
    sizes = (size,) * spatial_dims if isinstance(size, int) else tuple(size)
    if len(sizes) != spatial_dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 16 for s in sizes):
        raise ValueError(f"write_task: {what} must be an int >= 16 or {spatial_dims} such ints, got {size!r}")
    return sizes


def write_task(
    out: str | os.PathLike[str],
    *,
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 2,
    size: int | Sequence[int] = 48,
    eval_size: int | Sequence[int] | None = None,
    spatial_dims: int = 3,
    classes: int = 1,
    noise: float = 1.0,
    affine: str = "aniso",
    seed: int = 0,
) -> Path:
    """Write a synthetic task folder (see the module docstring); returns the ``dataset.json`` path.

    Args:
        out: task folder (created; existing files of the same names are replaced).
        n_train, n_val, n_test: number of training, validation and test cases.
        size: training volume size in voxels (int or one per spatial axis, each >= 16).
        eval_size: validation/test volume size; ``None``: ``4/3 * size`` rounded to a multiple of 8.
        spatial_dims: 2 or 3.
        classes: labeled shape families, 1 to 3 (1: round objects; 2: round and boxes; unlabeled rods
            are distractors unless ``classes=3``).
        noise: Gaussian noise sigma in units of ``NOISE_UNIT`` x the mean object contrast (>= 0).
        affine: ``"identity"``, ``"aniso"`` or ``"flip"`` (see :func:`geometry`).
        seed: every case is generated from ``(seed, case index)``.

    Examples:
        >>> write_task("data/medseg", n_train=16, n_val=4, spatial_dims=3, classes=1, noise=1.0)
        PosixPath('data/medseg/dataset.json')
    """
    from .nifti import write_image, write_mask

    check_choice("write_task", "spatial_dims", spatial_dims, (2, 3))
    check_choice("write_task", "affine", affine, AFFINES)
    check_choice("write_task", "classes", classes, tuple(range(1, MAX_CLASSES + 1)))
    check_positive_int("write_task", "n_train", n_train)
    for name, n in (("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"write_task: {name} must be an int >= 0, got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"write_task: noise must be a number >= 0, got {noise!r}")
    train_shape = _sizes(size, spatial_dims, "size")
    eval_shape = (
        tuple(int(8 * round(s * 4 / 3 / 8)) for s in train_shape)
        if eval_size is None
        else _sizes(eval_size, spatial_dims, "eval_size")
    )
    root = Path(out)
    aff, spacing = geometry(affine, spatial_dims)
    families = FAMILIES[spatial_dims]
    splits: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    plan = [("training", n_train, train_shape), ("validation", n_val, eval_shape), ("test", n_test, eval_shape)]
    index = 0
    for split, n, shape in plan:
        images, labels = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        for _ in range(n):
            case = f"synth_{index:03d}"
            rng = np.random.default_rng([seed, index])
            image, label = make_case(shape, affine=aff, classes=classes, noise=float(noise), rng=rng)
            write_image(root / images / f"{case}_0000.nii.gz", image, aff, compresslevel=1)
            write_mask(root / labels / f"{case}.nii.gz", label, aff)
            entry = {"image": f"./{images}/{case}_0000.nii.gz", "label": f"./{labels}/{case}.nii.gz"}
            splits[split].append(entry)
            index += 1
    labels_map = {"0": "background", **{str(k + 1): families[k] for k in range(classes)}}
    distractor = families[-1] if classes < MAX_CLASSES else None
    meta: dict[str, Any] = {
        "name": f"Synth{spatial_dims}D",
        "description": (
            f"mambazoo synthetic task: {', '.join(families[:classes])} labeled"
            + (f", {distractor}s as unlabeled distractors" if distractor else "")
            + f"; same contrast for every object; bias field; noise sigma {noise}; affine {affine}"
        ),
        "tensorImageSize": f"{spatial_dims}D",
        "reference": "generated by mz_pipelines.medseg.synth",
        "licence": "CC0",
        "channel_names": {"0": "MRI"},
        "labels": labels_map,
        "numTraining": n_train,
        "numValidation": n_val,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "spacing": list(spacing),
        "training": splits["training"],
        "validation": splits["validation"],
        "test": [e["image"] for e in splits["test"]],
        "synth": {
            "seed": seed,
            "noise": noise,
            "affine": affine,
            "size": list(train_shape),
            "eval_size": list(eval_shape),
            "classes": classes,
        },
    }
    return write_json(root / "dataset.json", meta)


def _fg_dice_curves(
    image: np.ndarray, label: np.ndarray, edges: np.ndarray, value: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dice of ``image > t`` and of ``image < t`` against ``label == value`` for every edge ``t``."""
    truth = label == value
    n_true = int(truth.sum())
    all_hist = np.histogram(image, bins=edges)[0]
    fg_hist = np.histogram(image[truth], bins=edges)[0]
    # voxels above edge k: sum of bins k.. ; below edge k: sum of bins ..k-1
    above_all = np.concatenate([np.cumsum(all_hist[::-1])[::-1], [0]])
    above_fg = np.concatenate([np.cumsum(fg_hist[::-1])[::-1], [0]])
    below_all, below_fg = all_hist.sum() - above_all, n_true - above_fg

    def dice(tp: np.ndarray, pred: np.ndarray) -> np.ndarray:
        denom = pred + n_true
        return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)

    return dice(above_fg, above_all), dice(below_fg, below_all)


def threshold_baseline(task: Any, split: str = "validation", *, n_thresholds: int = 256) -> dict[str, Any]:
    """Best single global intensity threshold on a split: the score a network has to beat.

    For each foreground class ``k`` the threshold ``t`` (and polarity ``>``/``<``) that maximises the
    mean over cases of Dice(``image[0] ⋛ t``, ``label == k``) is searched on the split itself (an
    upper bound for any threshold rule), on raw intensities of the first channel. Cases of the split
    are read and checked like training data.

    Args:
        task: :class:`~mz_pipelines.medseg.dataset_json.TaskInfo` (or a task folder path).
        split: ``"training"``, ``"validation"`` or ``"test"`` (cases need labels).
        n_thresholds: number of candidate thresholds between the 0.1 and 99.9 intensity percentiles.

    Returns:
        ``{"dice": mean over foreground classes, "per_class": {k: dice}, "threshold": {k: t},
        "polarity": {k: ">" | "<"}, "split": split, "n_cases": n}``.
    """
    from mz_pipelines.runtime.errors import UserError

    from .dataset_json import TaskInfo, read_task
    from .nifti import read_image, read_label

    info: TaskInfo = task if isinstance(task, TaskInfo) else read_task(task)
    check_choice("threshold_baseline", "split", split, ("training", "validation", "test"))
    check_positive_int("threshold_baseline", "n_thresholds", n_thresholds)
    cases = getattr(info, split)
    if not cases or any(c.label is None for c in cases):
        raise UserError(f"{info.root}: split {split!r} has no labeled cases to compute a threshold baseline on")
    label_values = sorted(info.labels)
    pairs = []
    for c in cases:
        img = read_image(c.images, case=c.name, spatial_dims=info.spatial_dims).array[0]
        lab = read_label(c.label, case=c.name, labels=label_values, spatial_dims=info.spatial_dims).array[0]
        if img.shape != lab.shape:
            raise UserError(f"case {c.name!r}: image shape {img.shape} and label shape {lab.shape} differ")
        pairs.append((img, lab))
    pooled = np.concatenate([p[0].ravel() for p in pairs])
    lo, hi = np.percentile(pooled, [0.1, 99.9])
    edges = np.linspace(lo, hi, n_thresholds + 1)
    edges = np.concatenate([[pooled.min() - 1.0], edges, [pooled.max() + 1.0]])
    per_class: dict[int, float] = {}
    thresholds: dict[int, float] = {}
    polarity: dict[int, str] = {}
    for k in (v for v in label_values if v != 0):
        above = np.zeros(len(edges))
        below = np.zeros(len(edges))
        for img, lab in pairs:
            a, b = _fg_dice_curves(img, lab, edges, k)
            above += a / len(pairs)
            below += b / len(pairs)
        ia, ib = int(np.argmax(above)), int(np.argmax(below))
        if above[ia] >= below[ib]:
            per_class[k], thresholds[k], polarity[k] = float(above[ia]), float(edges[ia]), ">"
        else:
            per_class[k], thresholds[k], polarity[k] = float(below[ib]), float(edges[ib]), "<"
    return {
        "dice": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "threshold": thresholds,
        "polarity": polarity,
        "split": split,
        "n_cases": len(cases),
    }
