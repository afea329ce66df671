"""What the medseg app does, as plain functions on a :class:`ViewerState` (no gradio here).

Display convention (every slice, whatever the file's voxel order): the volume is reordered to RAS
from its affine, then shown radiologically, the patient's right on the image's left; axial slices
have anterior up, coronal and sagittal slices superior up, and sagittal slices anterior on the left.
Pixels are made square from the voxel spacing (nearest neighbour) and intensities are windowed to
the 1st-99th percentile of the whole channel.

Examples:
    >>> state = load_volume(["case_0000.nii.gz"])
    >>> rgb = slice_views(state, "axial", state.n_slices("axial") // 2)   # [H, W, 3] uint8, no mask yet
    >>> state = segment(state, "runs/medseg/a")                            # run folder or best.pt
    >>> state.volumes_ml, save_mask(state, "out/")
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mz_pipelines.runtime.errors import UserError

if TYPE_CHECKING:
    from mz_pipelines.medseg.nifti import Volume

Axis = Literal["axial", "coronal", "sagittal"]
AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")
_AXIS_DIM = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS axis a view slices through
DISPLAY_MIN = 256  # shortest displayed edge in pixels (integer nearest-neighbour zoom)
DISPLAY_MAX = 1024  # longest displayed edge the zoom may reach
# Distinct colours (label value k uses PALETTE[(k - 1) % len(PALETTE)]).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)
EXAMPLE_SIZE = 48  # edge of the generated example volume (voxels; the synthetic task's default)


# ---------------------------------------------------------------- orientation and windowing


def ras_axes(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each world axis R, A, S: the voxel axis closest to it and whether it runs backwards.

    Args:
        affine: ``[4, 4]`` voxel-to-world (RAS+ mm) matrix; oblique axes go to the closest world axis.

    Returns:
        ``(perm, flips)``: ``perm[w]`` is the voxel axis along world axis ``w``; ``flips[w]`` is ``True``
        when increasing that voxel index decreases the world coordinate.

    Examples:
        >>> ras_axes(np.diag([-1.0, 1.0, 2.0, 1.0]))
        ((0, 1, 2), (True, False, False))
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ValueError(f"affine must be a finite [4, 4] array, got shape {a.shape}")
    rot = a[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if (norms == 0).any():
        raise ValueError(f"affine has a zero voxel axis (columns {np.flatnonzero(norms == 0).tolist()})")
    weight = np.abs(rot) / norms
    perm, flips = [0, 0, 0], [False, False, False]
    for _ in range(3):  # greedy: the strongest (world, voxel) pair first, then remove both
        w, v = np.unravel_index(int(np.argmax(weight)), weight.shape)
        perm[w], flips[w] = int(v), bool(rot[w, v] < 0)
        weight[w, :] = -1.0
        weight[:, v] = -1.0
    return (perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2])


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array [..., I, J, K]`` (voxel order of ``affine``) reordered to ``[..., X, Y, Z]`` in RAS order."""
    if array.ndim < 3:
        raise ValueError(f"array must have 3 spatial axes (last three), got shape {array.shape}")
    perm, flips = ras_axes(affine)
    lead = array.ndim - 3
    out = np.transpose(array, (*range(lead), *(lead + p for p in perm)))
    flip_axes = tuple(lead + w for w in range(3) if flips[w])
    return np.flip(out, axis=flip_axes) if flip_axes else out


def percentile_window(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Display window ``(lo, hi)``: the ``low`` and ``high`` percentiles of the finite values of ``array``.

    A constant (or empty) array gets a window of width 1 so it displays as black, not as noise.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentile_window: need 0 <= low < high <= 100, got low={low}, high={high}")
    values = np.asarray(array, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def apply_window(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[0, 255]`` (clipped; NaN -> 0); same shape, uint8."""
    if not hi > lo:
        raise ValueError(f"apply_window: need hi > lo, got lo={lo}, hi={hi}")
    scaled = (np.asarray(image, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.nan_to_num(np.clip(np.rint(scaled), 0, 255), nan=0.0).astype(np.uint8)


def display_slice(ras: np.ndarray, axis: str, index: int) -> np.ndarray:
    """One slice of a RAS-ordered volume ``[X, Y, Z]`` in display orientation.

    Returns:
        axial ``[Y, X]`` (anterior up), coronal ``[Z, X]`` and sagittal ``[Z, Y]`` (superior up); columns
        run from the patient's right to left (axial, coronal) and from anterior to posterior (sagittal).
    """
    dim = _axis_dim(axis)
    if ras.ndim != 3:
        raise ValueError(f"display_slice: ras must be [X, Y, Z], got shape {ras.shape}")
    n = ras.shape[dim]
    if not 0 <= index < n:
        raise ValueError(f"{axis} slice index must be in [0, {n - 1}], got {index}")
    slab = np.take(ras, index, axis=dim)  # [X, Y], [X, Z] or [Y, Z]
    return slab.T[::-1, ::-1]


def display_spacing(ras_spacing: Sequence[float], axis: str) -> tuple[float, float]:
    """``(row_mm, col_mm)`` of a :func:`display_slice` image, from the RAS-ordered voxel spacing."""
    sx, sy, sz = (float(s) for s in ras_spacing)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[_check_axis(axis)]


def square_pixels(image: np.ndarray, row_mm: float, col_mm: float, *, min_size: int = DISPLAY_MIN) -> np.ndarray:
    """Nearest-neighbour resize of ``image [H, W, ...]`` so pixels are square (anisotropic voxels keep
    their true proportions), then an integer zoom so the shorter edge reaches ``min_size`` pixels
    (without the longer edge passing :data:`DISPLAY_MAX`). Label images stay labels.
    """
    if row_mm <= 0 or col_mm <= 0:
        raise ValueError(f"square_pixels: spacing must be > 0, got row_mm={row_mm}, col_mm={col_mm}")
    h, w = image.shape[:2]
    base = min(row_mm, col_mm)
    rows, cols = max(1, round(h * row_mm / base)), max(1, round(w * col_mm / base))
    zoom = max(1, min(math.ceil(min_size / min(rows, cols)), DISPLAY_MAX // max(rows, cols)))
    rows, cols = rows * zoom, cols * zoom
    ri = ((np.arange(rows) + 0.5) * h / rows).astype(np.int64)
    ci = ((np.arange(cols) + 0.5) * w / cols).astype(np.int64)
    return image[ri][:, ci]


def label_colors(labels: Iterable[int]) -> dict[int, tuple[int, int, int]]:
    """A fixed colour per foreground label value (``PALETTE[(k - 1) % 10]``); background 0 is skipped."""
    return {int(k): PALETTE[(int(k) - 1) % len(PALETTE)] for k in labels if int(k) != 0}


def color_hex(rgb: Sequence[int]) -> str:
    """``(230, 25, 75)`` -> ``'#e6194b'``."""
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def overlay(
    image2d: np.ndarray, mask2d: np.ndarray | None, colors: Mapping[int, Sequence[int]], *, alpha: float = 0.45
) -> np.ndarray:
    """Blend label colours over a grey slice.

    Args:
        image2d: ``[H, W]`` uint8 grey (or ``[H, W, 3]`` uint8 RGB).
        mask2d: ``[H, W]`` integer labels (0 = background, left untouched) or ``None`` (no overlay).
        colors: label value -> ``(r, g, b)``; every non-zero value in ``mask2d`` needs one.
        alpha: opacity of the colours, in ``(0, 1]``.

    Returns:
        ``[H, W, 3]`` uint8.

    Examples:
        >>> overlay(np.zeros((2, 2), np.uint8), np.array([[0, 1], [0, 0]]), {1: (255, 0, 0)}, alpha=1.0)[0, 1]
        array([255,   0,   0], dtype=uint8)
    """
    img = np.asarray(image2d)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"image2d must be uint8 [H, W] or [H, W, 3], got {img.dtype} {img.shape}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img.copy()
    if mask2d is None:
        return rgb
    mask = np.asarray(mask2d)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask2d must have the image's shape {rgb.shape[:2]}, got {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask2d must hold integer labels, got dtype {mask.dtype}")
    present = [int(k) for k in np.unique(mask) if k != 0]
    missing = [k for k in present if k not in colors]
    if missing:
        raise ValueError(f"colors has no entry for label(s) {missing} (has {sorted(colors)})")
    out = rgb.astype(np.float64)
    for k in present:
        sel = mask == k
        out[sel] = (1.0 - alpha) * out[sel] + alpha * np.asarray(colors[k], dtype=np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- viewer state


@dataclass
class ViewerState:
    """One loaded case as the app sees it.

    ``volume`` is the image as read (voxel order of the file; the model and the saved mask use it);
    ``ras`` ``[C, X, Y, Z]`` and ``ras_mask`` ``[X, Y, Z]`` are display copies in RAS order (2D images
    get a singleton Z). ``mask`` ``[*spatial]`` is in ``volume``'s grid, ``labels`` maps foreground
    label values to names, ``volumes_ml`` label name -> mL.
    """

    name: str
    sources: tuple[Path, ...]
    volume: Volume
    ras: np.ndarray
    ras_spacing: tuple[float, float, float]
    windows: tuple[tuple[float, float], ...]
    mask: np.ndarray | None = None
    ras_mask: np.ndarray | None = None
    labels: dict[int, str] = field(default_factory=dict)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None

    @property
    def channels(self) -> int:
        return int(self.ras.shape[0])

    def n_slices(self, axis: str) -> int:
        """How many slices ``axis`` has (slider range ``0 .. n - 1``)."""
        return int(self.ras.shape[1 + _axis_dim(axis)])


def _spatial3(array: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Pad 2D spatial data ``[C, H, W]`` to ``[C, H, W, 1]`` (spacing 1 mm on the new axis)."""
    sp = tuple(float(s) for s in spacing)
    if array.ndim == 3:
        return array[..., None], (sp[0], sp[1], 1.0)
    if array.ndim != 4:
        raise ValueError(f"volume array must be [C, *spatial] with 2 or 3 spatial axes, got shape {array.shape}")
    return array, (sp[0], sp[1], sp[2])


def case_name(path: str | os.PathLike[str]) -> str:
    """``/x/liver_007_0000.nii.gz`` -> ``liver_007`` (NIfTI suffixes and an nnU-Net channel suffix dropped)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem, _, tail = name.rpartition("_")
    return stem if stem and len(tail) == 4 and tail.isdigit() else name


def state_from_volume(volume: Volume, *, name: str, sources: Sequence[Path] = ()) -> ViewerState:
    """A :class:`ViewerState` (no mask yet) for an in-memory ``nifti.Volume``."""
    arr, spacing = _spatial3(np.asarray(volume.array, dtype=np.float32), volume.spacing)
    perm, _ = ras_axes(volume.affine)
    ras = np.ascontiguousarray(to_ras(arr, volume.affine))
    return ViewerState(
        name=name,
        sources=tuple(Path(p) for p in sources),
        volume=volume,
        ras=ras,
        ras_spacing=(spacing[perm[0]], spacing[perm[1]], spacing[perm[2]]),
        windows=tuple(percentile_window(ras[c]) for c in range(ras.shape[0])),
    )


def load_volume(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, name: str | None = None) -> ViewerState:
    """Read a NIfTI image (one file, or one file per channel) into a fresh :class:`ViewerState`.

    Raises:
        UserError: no file given, or a file that is missing, not NIfTI, corrupt or truncated.
    """
    from mz_pipelines.medseg.nifti import read_image

    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise UserError("no image file given: upload a NIfTI file (.nii or .nii.gz)")
    case = name or case_name(files[0])
    return state_from_volume(read_image(files, case=case), name=case, sources=files)


def slice_views(state: ViewerState, axis: str, index: int, *, channel: int = 0, alpha: float = 0.45) -> np.ndarray:
    """The ``index``-th ``axis`` slice of ``channel``, windowed, square-pixelled, with the mask (if any) overlaid.

    Returns:
        ``[H, W, 3]`` uint8 (see the module docstring for the orientation).
    """
    if not 0 <= channel < state.channels:
        raise ValueError(f"channel must be in [0, {state.channels - 1}], got {channel}")
    lo, hi = state.windows[channel]
    grey = apply_window(display_slice(state.ras[channel], axis, index), lo, hi)
    mask = None if state.ras_mask is None else display_slice(state.ras_mask, axis, index)
    rgb = overlay(grey, mask, label_colors(state.labels), alpha=alpha)
    return square_pixels(rgb, *display_spacing(state.ras_spacing, axis))


def _check_axis(axis: str) -> str:
    if axis not in _AXIS_DIM:
        raise ValueError(f"axis must be one of {list(AXES)}, got {axis!r}")
    return axis


def _axis_dim(axis: str) -> int:
    return _AXIS_DIM[_check_axis(axis)]


# ---------------------------------------------------------------- checkpoints, segmentation, output


def find_checkpoints(root: str | os.PathLike[str] = "runs") -> list[str]:
    """Trained medseg runs under ``<root>/medseg/*``: one checkpoint per run (``best.pt``, else
    ``checkpoint.pt``), newest first. A missing ``root`` gives ``[]``.
    """
    found: list[tuple[float, str]] = []
    base = Path(root) / "medseg"
    if not base.is_dir():
        return []
    for run in base.iterdir():
        for fname in ("best.pt", "checkpoint.pt"):
            ckpt = run / fname
            if ckpt.is_file():
                found.append((ckpt.stat().st_mtime, str(ckpt)))
                break
    return [p for _, p in sorted(found, key=lambda t: (-t[0], t[1]))]


def _label_names(labels: Mapping[Any, str], out_channels: int) -> dict[int, str]:
    """Foreground label value -> name from a config's ``model.labels`` (keys may be strings)."""
    names = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    return names or {k: f"label_{k}" for k in range(1, out_channels)}


def segment(state: ViewerState, checkpoint: str | os.PathLike[str], *, device: str = "cpu") -> ViewerState:
    """Run the trained model of ``checkpoint`` (``best.pt``/``checkpoint.pt`` or a run folder) on ``state``.

    Returns:
        A new state with ``mask`` (``[*spatial]`` int, the input's grid), its display copy, the label
        names and the per-label volumes in mL.

    Raises:
        UserError: no checkpoint given, an unreadable checkpoint, or an image the model cannot take
        (channel count or spatial dimensionality).
    """
    from mz_pipelines.medseg.predict import label_volumes_ml, predict_array
    from mz_pipelines.medseg.task import load_trained

    if not str(checkpoint).strip():
        raise UserError("no checkpoint chosen: pick a run or give the path of a best.pt / checkpoint.pt / run folder")
    model, cfg = load_trained(Path(str(checkpoint).strip()), device=device)
    volume = state.volume
    n_in, dims = int(cfg.model.in_channels), int(cfg.data.spatial_dims)
    if volume.array.shape[0] != n_in:
        raise UserError(f"{state.name}: the model takes {n_in} channel(s), the image has {volume.array.shape[0]}")
    spatial = volume.array.shape[1:]
    if dims == 2 and len(spatial) == 3 and spatial[2] == 1:  # a 2D image stored with a singleton 3rd axis
        volume = dataclasses.replace(volume, array=volume.array[..., 0], spacing=tuple(volume.spacing[:2]))
    if volume.array.ndim - 1 != dims:
        raise UserError(f"{state.name}: the model is {dims}D, the image has spatial shape {tuple(spatial)}")
    mask = np.asarray(predict_array(model, volume, cfg=cfg, device=device))
    if mask.shape != volume.array.shape[1:]:
        raise RuntimeError(f"predict_array returned shape {mask.shape} for an image of spatial shape {volume.array.shape[1:]}")
    labels = _label_names(cfg.model.labels, int(cfg.model.out_channels))
    voxel_mm = list(volume.spacing)
    if dims == 2:  # a 2D voxel is as thick as the file's slice axis
        voxel_mm.append(float(np.linalg.norm(volume.affine[:3, 2])) or 1.0)
    volumes = label_volumes_ml(mask, voxel_mm, labels)
    mask = mask.reshape(spatial)  # back to the file's own shape (a squeezed singleton axis returns)
    mask3, _ = _spatial3(mask[None], state.volume.spacing)
    return dataclasses.replace(
        state,
        mask=mask,
        ras_mask=np.ascontiguousarray(to_ras(mask3[0], state.volume.affine)),
        labels=labels,
        volumes_ml={str(k): float(v) for k, v in volumes.items()},
        checkpoint=str(checkpoint),
    )


def volume_rows(state: ViewerState) -> list[list[Any]]:
    """Table rows ``[label, name, colour, voxels, volume_ml]`` for every foreground label (empty before segmenting)."""
    if state.mask is None:
        return []
    counts = np.bincount(state.mask.astype(np.int64).ravel(), minlength=max(state.labels, default=0) + 1)
    colors = label_colors(state.labels)
    return [
        [k, name, color_hex(colors[k]), int(counts[k]), round(float(state.volumes_ml.get(name, 0.0)), 3)]
        for k, name in sorted(state.labels.items())
    ]


VOLUME_HEADERS = ["label", "name", "colour", "voxels", "volume_ml"]


def save_mask(state: ViewerState, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``<out_dir>/<case>_seg.nii.gz`` (the input's shape and affine) and return its path.

    Raises:
        UserError: nothing segmented yet.
    """
    from mz_pipelines.medseg.nifti import write_mask

    if state.mask is None:
        raise UserError(f"{state.name}: nothing to save yet, run the segmentation first")
    out = Path(out_dir) / f"{state.name}_seg.nii.gz"
    return Path(write_mask(out, state.mask, state.volume.affine, shape=state.volume.file_shape or None))


def example_image(cache_dir: str | os.PathLike[str], *, size: int = EXAMPLE_SIZE, seed: int = 0) -> list[Path]:
    """The image file(s) of one synthetic test case ``[size]^3``, generated into ``cache_dir`` on first
    use (3D, one class, anisotropic spacing; see ``mz_pipelines.medseg.synth``) and reused after.
    """
    from mz_pipelines.medseg.dataset_json import read_task
    from mz_pipelines.medseg.synth import write_task

    root = Path(cache_dir) / f"example_{size}_{seed}"
    if not (root / "dataset.json").is_file():
        write_task(root, n_train=1, n_val=0, n_test=1, size=size, eval_size=size, spatial_dims=3, affine="aniso", seed=seed)
    task = read_task(root)
    cases = task.test or task.validation or task.training
    if not cases:
        raise UserError(f"{root}: the generated example task has no cases")
    return list(cases[0].images)
