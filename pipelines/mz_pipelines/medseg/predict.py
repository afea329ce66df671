"""NIfTI in, mask out in the input's own geometry, plus per-label volumes in mL.

:func:`predict_array` preprocesses a volume like evaluation does (orientation RAS, optional
resampling to ``cfg.data.spacing``, intensity), runs sliding-window inference, and maps the class
probabilities back onto the original voxel grid through the two affines (trilinear, then argmax), so
the mask has exactly the input's shape and affine whatever orientation or spacing the model saw.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.files import write_json

from .config import MedsegConfig
from .nifti import Volume, read_image, write_mask
from .transforms import eval_transforms, to_meta


def label_volumes_ml(mask: np.ndarray, spacing: Sequence[float], labels: Mapping[int, str]) -> dict[str, float]:
    """Volume of every foreground label of ``mask`` ``[*S]`` in mL: voxels x prod(spacing mm) / 1000.

    ``labels`` maps label values to names (background 0 is skipped); absent labels get 0.0.
    ``spacing`` has one value per voxel axis (for 2D masks pass the slice thickness as a third value).

    Examples:
        >>> label_volumes_ml(np.ones((10, 10, 10), int), (0.8, 0.8, 1.5), {0: "background", 1: "tumor"})
        {'tumor': 0.96}
    """
    m = np.asarray(mask)
    if not np.issubdtype(m.dtype, np.integer) and m.dtype != bool:
        raise ValueError(f"label_volumes_ml: mask must have an integer dtype, got {m.dtype}")
    if len(spacing) < m.ndim or min(spacing) <= 0:
        raise ValueError(f"label_volumes_ml: spacing must be >= {m.ndim} positive values (mm), got {list(spacing)}")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    counts = np.bincount(m.ravel().astype(np.int64), minlength=max([0, *labels]) + 1) if m.size else np.zeros(1, int)
    return {name: float(counts[k]) * voxel_ml if k < len(counts) else 0.0 for k, name in sorted(labels.items()) if k != 0}


def resample_to_grid(
    values: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int], *, order: int = 1
) -> np.ndarray:
    """Resample ``values`` ``[C, *S_src]`` (voxel-to-world ``src_affine``) onto the grid ``dst_shape``
    with ``dst_affine`` (both ``[4, 4]``): ``[C, *dst_shape]``. Points outside take the nearest edge value.

    Pure axis permutations and flips (no resampling) map voxel centres exactly onto voxel centres.
    """
    from scipy import ndimage

    d = values.ndim - 1
    full = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    rows = list(range(d))
    matrix, offset = full[np.ix_(rows, rows)], full[rows, 3]
    snapped_m, snapped_o = np.round(matrix), np.round(offset)
    if np.allclose(matrix, snapped_m, atol=1e-4) and np.allclose(offset, snapped_o, atol=1e-4):
        matrix, offset = snapped_m, snapped_o
    out = np.empty((values.shape[0], *dst_shape), dtype=np.float32)
    for c in range(values.shape[0]):
        out[c] = ndimage.affine_transform(
            values[c].astype(np.float32), matrix, offset, output_shape=tuple(dst_shape), order=order, mode="nearest"
        )
    return out


def predict_array(
    model: nn.Module, volume: Volume, *, cfg: MedsegConfig, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Segment one volume; returns the label mask ``[*spatial]`` int64 in the volume's own geometry.

    Args:
        model: ``forward(x [B, C_in, *roi]) -> logits [B, C_out, *roi]``, already on ``device``.
        volume: :class:`~.nifti.Volume` as read by :func:`~.nifti.read_image` (``[C_in, *spatial]``).
        cfg: config whose ``data`` (spacing, intensity, roi) and ``infer`` sections are used.
        device: where the image tensor goes for inference.

    Raises:
        UserError: the volume's dimensionality or channel count does not fit the config.
    """
    from .inference import sliding_window_predict

    d = cfg.data.spatial_dims
    if volume.spatial_dims != d:
        raise UserError(f"image is {volume.spatial_dims}D {volume.spatial_shape} but the model expects {d}D input")
    if cfg.model.in_channels and volume.array.shape[0] != cfg.model.in_channels:
        raise UserError(f"image has {volume.array.shape[0]} channel(s), the model expects {cfg.model.in_channels}")
    spacing = tuple(float(s) for s in cfg.data.spacing) or None
    pre = eval_transforms(spatial_dims=d, spacing=spacing, intensity=cfg.data.intensity, load=False, with_label=False)
    image = pre({"image": to_meta(volume.array.astype(np.float32), volume.affine)})["image"]
    proc_affine = np.asarray(image.affine, dtype=np.float64)
    x = image.as_tensor().float()[None].to(device)
    probs = sliding_window_predict(
        model, x, roi=tuple(cfg.data.roi), overlap=cfg.infer.overlap, mode=cfg.infer.mode,
        sw_batch_size=cfg.infer.sw_batch_size, tta=cfg.infer.tta,
    )[0].cpu().numpy()
    back = resample_to_grid(probs, proc_affine, volume.affine, volume.spatial_shape, order=1)
    return np.argmax(back, axis=0).astype(np.int64)


def case_name(path: str | os.PathLike[str]) -> str:
    """Case name of an image file: the name without ``.nii.gz``/``.nii`` and an nnU-Net ``_0000`` suffix."""
    name = Path(path).name
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return re.sub(r"_\d{4}$", "", name)


def _labels_of(cfg: MedsegConfig, mask: np.ndarray) -> dict[int, str]:
    if cfg.model.labels:
        return {int(k): str(v) for k, v in cfg.model.labels.items()}
    n = cfg.model.out_channels or int(mask.max(initial=0)) + 1
    return {0: "background", **{k: f"label_{k}" for k in range(1, n)}}


def predict_file(
    model: nn.Module,
    image_paths: Sequence[str | os.PathLike[str]],
    *,
    cfg: MedsegConfig,
    out_dir: str | os.PathLike[str],
    case: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Segment one case from its channel files and write ``<case>_seg.nii.gz`` and ``<case>_volumes.json``.

    The mask file has exactly the input's data shape (a squeezed 2D singleton axis is restored) and
    its affine (sform and qform). Volumes use the input's voxel size (for 2D images the file's slice
    thickness is the third factor).

    Returns:
        ``{"case", "mask": Path, "volumes": Path, "volumes_ml": {label name: mL}, "shape": [...],
        "spacing_mm": [...]}``.

    Raises:
        UserError: unreadable/corrupt input, or an input that does not fit the model.

    Examples:
        >>> model, cfg = load_trained("runs/a")
        >>> predict_file(model, ["case_0000.nii.gz"], cfg=cfg, out_dir="out")["volumes_ml"]
        {'sphere': 12.4}
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise UserError("predict: no input image files given")
    name = case or case_name(paths[0])
    volume = read_image(
        paths, case=name, spatial_dims=cfg.data.spatial_dims, channels=cfg.model.in_channels or None
    )
    try:
        mask = predict_array(model, volume, cfg=cfg, device=device)
    except UserError as e:
        raise UserError(f"case {name!r}: {e}") from None
    out = Path(out_dir)
    mask_path = write_mask(out / f"{name}_seg.nii.gz", mask, volume.affine, shape=volume.file_shape)
    voxel_spacing = list(volume.spacing)
    if volume.spatial_dims == 2:
        voxel_spacing.append(float(np.linalg.norm(volume.affine[:3, 2])) or 1.0)
    labels = _labels_of(cfg, mask)
    volumes = label_volumes_ml(mask, voxel_spacing, labels)
    json_path = write_json(
        out / f"{name}_volumes.json",
        {
            "case": name,
            "inputs": [str(p) for p in paths],
            "mask": mask_path.name,
            "volumes_ml": volumes,
            "labels": {str(k): v for k, v in sorted(labels.items())},
            "spacing_mm": voxel_spacing,
            "shape": list(volume.file_shape),
        },
    )
    return {
        "case": name,
        "mask": mask_path,
        "volumes": json_path,
        "volumes_ml": volumes,
        "shape": list(volume.file_shape),
        "spacing_mm": voxel_spacing,
    }
