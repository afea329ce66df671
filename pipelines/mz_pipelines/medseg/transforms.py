"""MONAI dictionary transforms for training patches and whole-volume evaluation.

Keys are ``"image"`` (``[C, *S]``) and ``"label"`` (``[1, *S]``). The chain has two parts:

- :func:`preprocess_transforms` (deterministic, cached once per volume): optional
  ``LoadImaged`` + ``EnsureChannelFirstd``, ``Orientationd`` to RAS (always), ``Spacingd`` (only
  when ``spacing`` is given; bilinear for images, nearest for labels), then the intensity
  transform. Training adds ``CropForegroundd`` (non-zero region of the raw image, as nnU-Net does)
  and ``SpatialPadd`` to the patch size.
- :func:`augment_transforms` (random, per patch): ``RandCropByPosNegLabeld`` with ``pos``/``neg``
  weights (negative centres are any background voxel, so patches with no foreground occur) and light
  random flips along every spatial axis.

Intensity specs: ``"zscore"`` subtracts the mean and divides by the std of each channel's non-zero
voxels (zeros stay zero: MRI background outside the body is left alone, which is why this is
foreground- rather than whole-volume-normalisation; for data without exact zeros it equals
whole-volume z-scoring); ``"ct:A,B"`` clips to ``[A, B]`` and scales to ``[0, 1]``; ``"none"``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mz_kernels._validate import check_choice, check_positive_int

from .config import check_intensity

AXCODES = {2: "RA", 3: "RAS"}
_ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _nonzero(x: Any) -> Any:
    """Foreground selector of ``CropForegroundd``: any non-zero voxel (module level, so picklable)."""
    return x != 0


def _check_common(op: str, spatial_dims: int, spacing: Sequence[float] | None, intensity: str) -> None:
    check_choice(op, "spatial_dims", spatial_dims, (2, 3))
    if spacing is not None and (len(spacing) != spatial_dims or min(spacing) <= 0):
        raise ValueError(f"{op}: spacing must be None or {spatial_dims} positive numbers (mm), got {list(spacing)}")
    try:
        check_intensity(intensity)
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None


def _check_roi(op: str, roi: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    roi_t = tuple(roi)
    if len(roi_t) != spatial_dims or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi_t):
        raise ValueError(f"{op}: roi must be {spatial_dims} positive ints, got {list(roi_t)}")
    return roi_t


def intensity_transform(intensity: str, keys: str = "image") -> Any:
    """The MONAI dict transform of an intensity spec (see the module docstring); ``None`` for ``"none"``."""
    from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

    check_intensity(intensity)
    if intensity == "zscore":
        return NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)
    if intensity.startswith("ct:"):
        low, high = (float(v) for v in intensity[3:].split(","))
        return ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    return None


def preprocess_transforms(
    *,
    spatial_dims: int,
    spacing: Sequence[float] | None,
    intensity: str,
    roi: Sequence[int] | None = None,
    load: bool = False,
    with_label: bool = True,
) -> Any:
    """Deterministic part: [load], orientation RAS, [spacing], intensity, [crop foreground + pad to ``roi``].

    Args:
        spatial_dims: 2 or 3.
        spacing: target voxel size in mm per spatial axis, or ``None`` to keep each volume's own.
        intensity: ``"zscore"``, ``"ct:A,B"`` or ``"none"``.
        roi: patch size; when given, crop to the non-zero region and pad up to ``roi`` (training);
            ``None`` keeps the whole volume (evaluation, prediction: geometry stays invertible).
        load: start with ``LoadImaged`` + ``EnsureChannelFirstd`` (items hold file paths); ``False``
            expects ``MetaTensor`` items ``[C, *S]`` with their affine (see :mod:`.data`).
        with_label: the items have a ``"label"`` key.

    Returns:
        ``monai.transforms.Compose``.
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Spacingd,
        SpatialPadd,
    )

    _check_common("preprocess_transforms", spatial_dims, spacing, intensity)
    keys = ["image", "label"] if with_label else ["image"]
    chain: list[Any] = []
    if load:
        chain += [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys)]
    chain.append(Orientationd(keys=keys, axcodes=AXCODES[spatial_dims], labels=_ORIENTATION_LABELS))
    if spacing is not None:
        modes = ("bilinear", "nearest") if with_label else ("bilinear",)
        chain.append(Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=modes))
    if roi is not None:
        roi_t = _check_roi("preprocess_transforms", roi, spatial_dims)
        chain.append(CropForegroundd(keys=keys, source_key="image", select_fn=_nonzero, allow_smaller=True))
    norm = intensity_transform(intensity)
    if norm is not None:
        chain.append(norm)
    if roi is not None:
        chain.append(SpatialPadd(keys=keys, spatial_size=roi_t))
    return Compose(chain)


def augment_transforms(
    *, spatial_dims: int, roi: Sequence[int], pos: float = 1.0, neg: float = 1.0, num_samples: int = 1, flip_prob: float = 0.2
) -> Any:
    """Random part: ``RandCropByPosNegLabeld`` (``num_samples`` patches of ``roi``) and random flips.

    Returns:
        ``monai.transforms.Compose`` mapping one item to a list of ``num_samples`` patch items.
    """
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd

    check_choice("augment_transforms", "spatial_dims", spatial_dims, (2, 3))
    roi_t = _check_roi("augment_transforms", roi, spatial_dims)
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ValueError(f"augment_transforms: pos and neg must be >= 0 and not both 0, got {pos}, {neg}")
    check_positive_int("augment_transforms", "num_samples", num_samples)
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"augment_transforms: flip_prob must be in [0, 1], got {flip_prob}")
    keys = ["image", "label"]
    chain: list[Any] = [
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi_t, pos=pos, neg=neg, num_samples=num_samples, allow_smaller=False
        )
    ]
    if flip_prob > 0:
        chain += [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(spatial_dims)]
    return Compose(chain)


def train_transforms(
    *,
    spatial_dims: int,
    roi: tuple[int, ...],
    spacing: tuple[float, ...] | None,
    intensity: str,
    pos: float = 1.0,
    neg: float = 1.0,
    num_samples: int = 1,
    load: bool = True,
) -> Any:
    """Full training chain on file items ``{"image": path(s), "label": path}`` (``load=True``) or on
    ``MetaTensor`` items (``load=False``): :func:`preprocess_transforms` then :func:`augment_transforms`.

    Returns:
        ``monai.transforms.Compose``; applied to one item it gives a list of ``num_samples`` dicts with
        ``"image"`` ``[C, *roi]`` and ``"label"`` ``[1, *roi]``.

    Examples:
        >>> t = train_transforms(spatial_dims=3, roi=(32, 32, 32), spacing=None, intensity="zscore")
        >>> patches = t({"image": "imagesTr/a_0000.nii.gz", "label": "labelsTr/a.nii.gz"})
    """
    from monai.transforms import Compose

    pre = preprocess_transforms(spatial_dims=spatial_dims, spacing=spacing, intensity=intensity, roi=roi, load=load)
    aug = augment_transforms(spatial_dims=spatial_dims, roi=roi, pos=pos, neg=neg, num_samples=num_samples)
    return Compose([*pre.transforms, *aug.transforms])


def eval_transforms(
    *,
    spatial_dims: int,
    spacing: tuple[float, ...] | None,
    intensity: str,
    load: bool = True,
    with_label: bool = True,
) -> Any:
    """Whole-volume chain (no crop, no padding): [load], orientation RAS, [spacing], intensity.

    Outputs are ``MetaTensor`` s whose ``affine`` describes the preprocessed grid and whose
    ``applied_operations`` allow ``monai.transforms.Invertd``; :mod:`.predict` maps predictions back
    with the affines directly.
    """
    return preprocess_transforms(
        spatial_dims=spatial_dims, spacing=spacing, intensity=intensity, roi=None, load=load, with_label=with_label
    )


def to_meta(array: np.ndarray, affine: np.ndarray) -> Any:
    """``MetaTensor`` ``[C, *S]`` (2 or 3 spatial axes) with a ``[4, 4]`` file affine, as ``LoadImaged`` makes."""
    import torch
    from monai.data import MetaTensor

    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=aff)


def spatial_affine(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The ``[d+1, d+1]`` voxel-to-world matrix of the first ``d`` axes of a ``[4, 4]`` affine.

    For 3D this is ``affine`` itself; for 2D it keeps rows/columns of the two in-plane axes and the
    translation (the slice axis is dropped).
    """
    aff = np.asarray(affine, dtype=np.float64)
    if spatial_dims == 3:
        return aff.copy()
    keep = [0, 1, 3]
    return aff[np.ix_(keep, keep)].copy()
