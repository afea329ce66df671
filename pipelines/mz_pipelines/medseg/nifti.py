"""Reading and writing NIfTI volumes, with one clear :class:`UserError` per bad file.

Every reader names the case and the file in its message, e.g.
``case 'case_003': label file labelsTr/case_003.nii.gz has values [7] outside the labels [0, 1, 2]``.
Arrays are channel-first: images ``[C, *spatial]`` float32, labels ``[1, *spatial]`` int64, with
``spatial`` of 2 axes (2D task) or 3 axes. 2D images may be stored as true 2D NIfTI or with a trailing
singleton third axis; the singleton axis is dropped only when the caller says the task is 2D.
"""
from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.files import atomic_open


@dataclass
class Volume:
    """A channel-first array with its voxel-to-world (RAS mm) geometry.

    Attributes:
        array: ``[C, *spatial]`` (images: float32; labels and masks: int64 with ``C = 1``).
        affine: ``[4, 4]`` float64 voxel-to-world matrix of the file (for 2D data the third column is
            the file's unused slice axis).
        spacing: voxel size in mm, one value per spatial axis.
        file_shape: the data shape as stored in the file (restores a squeezed singleton axis on write).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    file_shape: tuple[int, ...] = field(default=())

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])


def short_name(path: Path) -> str:
    """``parent/name`` of a file: enough to find it, short enough for a one-line message."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _squash(text: object, limit: int = 100) -> str:
    return " ".join(str(text).split())[:limit]


def load_header(path: str | os.PathLike[str], *, case: str):  # -> nibabel.Nifti1Image (lazy data)
    """The NIfTI image object of ``path`` with its data not yet read (header-level checks)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"case {case!r}: file not found: {p}")
    try:
        return nib.load(str(p))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"case {case!r}: cannot read {short_name(p)} as NIfTI ({_squash(e)})") from None


def load_data(path: Path, *, case: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of one file; data as stored (no squeezing), affine ``[4, 4]`` float64."""
    img = load_header(path, case=case)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"case {case!r}: {short_name(path)} is corrupt or truncated ({_squash(e)})") from None
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise UserError(f"case {case!r}: {short_name(path)} contains NaN or infinite values")
    return data, np.asarray(img.affine, dtype=np.float64)


def _spatial(
    data: np.ndarray, spatial_dims: int | None, *, case: str, path: Path, allow_channels: bool
) -> tuple[np.ndarray, tuple[int, ...]]:
    """``([C, *spatial], stored spatial shape)`` of a stored array (channels last in 4D files, as in MSD)."""
    stored = tuple(data.shape)
    if allow_channels and spatial_dims == 2 and data.ndim == 4 and data.shape[2] == 1:  # [H, W, 1, C]
        return np.moveaxis(data[:, :, 0], -1, 0), stored[:-1]
    if spatial_dims == 2 and data.ndim == 3 and data.shape[2] == 1:
        return data[None, :, :, 0], stored
    want = spatial_dims or (3 if data.ndim >= 3 else 2)
    if data.ndim == want:
        return data[None], stored
    if allow_channels and data.ndim == want + 1:
        return np.moveaxis(data, -1, 0), stored[:-1]
    raise UserError(
        f"case {case!r}: {short_name(path)} has shape {tuple(data.shape)}, expected a {want}D volume"
        + (" (or one more axis of channels)" if allow_channels else "")
    )


def spacing_of(affine: np.ndarray, spatial_dims: int) -> tuple[float, ...]:
    """Voxel size in mm of the first ``spatial_dims`` axes (column norms of the affine)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :spatial_dims], axis=0))


def read_image(
    paths: Sequence[str | os.PathLike[str]],
    *,
    case: str,
    spatial_dims: int | None = None,
    channels: int | None = None,
) -> Volume:
    """Read an image: one file per channel (nnU-Net) or a single file with channels last (MSD 4D).

    Args:
        paths: the channel files in channel order.
        case: case name used in error messages.
        spatial_dims: 2 or 3; ``None`` infers it from the file (3 axes or more: 3D).
        channels: expected channel count (``None``: any).

    Returns:
        :class:`Volume` with ``array`` ``[C, *spatial]`` float32.

    Raises:
        UserError: missing, unreadable, corrupt or truncated file; channel files of different shapes
            or geometry; wrong number of channels.

    Examples:
        >>> vol = read_image([Path("imagesTr/case_000_0000.nii.gz")], case="case_000", spatial_dims=3)
        >>> vol.array.shape  # [1, 48, 48, 48]
    """
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"read_image: spatial_dims must be 2, 3 or None, got {spatial_dims!r}")
    files = [Path(p) for p in paths]
    if not files:
        raise UserError(f"case {case!r}: no image files given")
    arrays: list[np.ndarray] = []
    affine, file_shape = None, ()
    for p in files:
        data, aff = load_data(p, case=case)
        arr, stored = _spatial(data, spatial_dims, case=case, path=p, allow_channels=len(files) == 1)
        if affine is None:
            affine, file_shape = aff, stored
        else:
            if arr.shape[1:] != arrays[0].shape[1:]:
                raise UserError(
                    f"case {case!r}: channel file {short_name(p)} has shape {arr.shape[1:]}, "
                    f"expected {arrays[0].shape[1:]} like {short_name(files[0])}"
                )
            if not np.allclose(aff, affine, atol=1e-3):
                raise UserError(f"case {case!r}: channel file {short_name(p)} has a different affine than {short_name(files[0])}")
        arrays.append(arr.astype(np.float32, copy=False))
    array = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
    if channels is not None and array.shape[0] != channels:
        raise UserError(
            f"case {case!r}: expected {channels} image channel(s), got {array.shape[0]} "
            f"(files: {', '.join(short_name(p) for p in files)})"
        )
    assert affine is not None
    return Volume(np.ascontiguousarray(array), affine, spacing_of(affine, array.ndim - 1), file_shape)


def check_label_values(values: np.ndarray, *, case: str, path: Path, labels: Sequence[int]) -> None:
    """UserError when ``values`` (the unique values of a label file) are not integers in ``labels``."""
    if values.size and not np.all(np.equal(np.mod(values, 1), 0)):
        bad = [float(v) for v in values if v % 1 != 0][:5]
        raise UserError(f"case {case!r}: label file {short_name(path)} has non-integer values {bad}; expected {sorted(labels)}")
    extra = sorted({int(v) for v in values} - {int(v) for v in labels})
    if extra:
        raise UserError(
            f"case {case!r}: label file {short_name(path)} has values {extra[:5]} outside the labels {sorted(int(v) for v in labels)}"
        )


def read_label(
    path: str | os.PathLike[str],
    *,
    case: str,
    labels: Sequence[int],
    spatial_dims: int | None = None,
) -> Volume:
    """Read a label map and check its values.

    Args:
        path: the label file.
        case: case name used in error messages.
        labels: allowed label values (background 0 included).
        spatial_dims: 2 or 3; ``None`` infers it from the file.

    Returns:
        :class:`Volume` with ``array`` ``[1, *spatial]`` int64.

    Raises:
        UserError: unreadable/corrupt file, more than one channel, non-integer values or values
            outside ``labels``.
    """
    p = Path(path)
    data, affine = load_data(p, case=case)
    arr, stored = _spatial(data, spatial_dims, case=case, path=p, allow_channels=False)
    check_label_values(np.unique(arr), case=case, path=p, labels=labels)
    return Volume(arr.astype(np.int64), affine, spacing_of(affine, arr.ndim - 1), stored)


def write_mask(
    path: str | os.PathLike[str],
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    shape: Sequence[int] | None = None,
) -> Path:
    """Write an integer mask ``[*spatial]`` as NIfTI (gzip when the name ends in ``.gz``), atomically.

    The data type is uint8 (values up to 255) or int16; sform and qform both hold ``affine``.
    ``shape`` (e.g. a :class:`Volume`'s ``file_shape``) restores a squeezed singleton axis.
    """
    import nibabel as nib

    m = np.asarray(mask)
    if not np.issubdtype(m.dtype, np.integer) and m.dtype != bool:
        raise ValueError(f"write_mask: mask must have an integer dtype, got {m.dtype}")
    if m.ndim not in (2, 3):
        raise ValueError(f"write_mask: mask must be [*spatial] with 2 or 3 axes, got shape {m.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"write_mask: affine must be [4, 4], got {aff.shape}")
    if shape is not None:
        if int(np.prod(shape)) != m.size:
            raise ValueError(f"write_mask: shape {tuple(shape)} does not hold a mask of shape {m.shape}")
        m = m.reshape(tuple(shape))
    low, high = (int(m.min()), int(m.max())) if m.size else (0, 0)
    dtype = np.uint8 if low >= 0 and high <= 255 else np.int16
    img = nib.Nifti1Image(m.astype(dtype), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_data_dtype(dtype)
    raw = img.to_bytes()
    out = Path(path)
    with atomic_open(out, "wb") as f:
        f.write(gzip.compress(raw, compresslevel=6) if out.name.endswith(".gz") else raw)
    return out


def write_image(
    path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray, *, compresslevel: int = 6
) -> Path:
    """Write a float image ``[*spatial]`` (float32 NIfTI, sform+qform = ``affine``), atomically.

    ``compresslevel`` (1 fastest .. 9 smallest) applies to ``.nii.gz`` names.
    """
    import nibabel as nib

    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    out = Path(path)
    with atomic_open(out, "wb") as f:
        raw = img.to_bytes()
        f.write(gzip.compress(raw, compresslevel=compresslevel) if out.name.endswith(".gz") else raw)
    return out
