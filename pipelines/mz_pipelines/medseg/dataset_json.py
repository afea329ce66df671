"""Reading and validating a Decathlon (MSD) or nnU-Net style task folder.

Accepted ``dataset.json`` forms:

- nnU-Net: ``"channel_names": {"0": "MRI"}``, one file per channel ``imagesTr/<case>_0000.nii.gz``
  (an entry's ``"image"`` names the ``_0000`` file, the others are found by their suffix);
  without a ``"training"`` list the cases are discovered from ``imagesTr/`` and ``labelsTr/``.
- MSD: ``"modality": {"0": "FLAIR", ...}``, ``"image": "./imagesTr/x.nii.gz"`` (4D for several
  channels), ``"test": ["./imagesTs/y.nii.gz", ...]``.

``labels`` may map values to names (``{"0": "background", "1": "tumor"}``) or names to values
(nnU-Net v2). Without a ``"validation"`` list, a deterministic 20% of the training cases (ordered
by a hash of their names) is held out. Test cases get labels from ``labelsTs/`` when present.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mz_pipelines.runtime.errors import UserError

SPLITS = ("training", "validation", "test")
HOLDOUT_FRACTION = 0.2


@dataclass
class Case:
    """One case: its channel files (in channel order) and label file (``None`` when unlabeled)."""

    name: str
    images: list[Path]
    label: Path | None = None


@dataclass
class TaskInfo:
    """A task folder as read from its ``dataset.json``."""

    root: Path
    name: str
    spatial_dims: int
    labels: dict[int, str]
    channel_names: list[str]
    training: list[Case] = field(default_factory=list)
    validation: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)

    def split(self, name: str) -> list[Case]:
        """The cases of ``"training"``, ``"validation"`` or ``"test"``."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return list(getattr(self, name))


def _ending(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _strip(name: str) -> str:
    return name[: -len(_ending(name))] if _ending(name) else name


def _parse_labels(raw: Any, where: Path) -> dict[int, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where}: 'labels' must be a non-empty object like {{\"0\": \"background\", \"1\": \"tumor\"}}")
    out: dict[int, str] = {}
    try:
        if all(re.fullmatch(r"-?\d+", str(k)) for k in raw):
            out = {int(k): str(v) for k, v in raw.items()}
        else:  # nnU-Net v2: name -> value (regions, i.e. lists, are not supported)
            out = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise UserError(f"{where}: 'labels' must map integer values to names (or names to integers), got {dict(raw)}") from None
    if 0 not in out or any(v < 0 for v in out):
        raise UserError(f"{where}: 'labels' must contain 0 (background) and no negative values, got {sorted(out)}")
    return dict(sorted(out.items()))


def _parse_channels(meta: Mapping[str, Any], where: Path) -> list[str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where}: missing 'channel_names' (nnU-Net) or 'modality' (MSD), e.g. {{\"0\": \"MRI\"}}")
    try:
        keys = sorted(int(k) for k in raw)
    except ValueError:
        raise UserError(f"{where}: 'channel_names' keys must be channel indices 0..C-1, got {list(raw)}") from None
    if keys != list(range(len(keys))):
        raise UserError(f"{where}: 'channel_names' keys must be 0..{len(keys) - 1}, got {keys}")
    return [str(raw[str(k)]) for k in keys]


def _channel_files(root: Path, rel: Any, n_channels: int, where: Path) -> list[Path]:
    """Channel files of one entry: a list, a ``_0000`` file (siblings by suffix) or one (4D) file."""
    if isinstance(rel, list):
        if not rel or not all(isinstance(r, str) for r in rel):
            raise UserError(f"{where}: an 'image' list must hold file paths, got {rel!r}")
        return [(root / r).resolve() for r in rel]
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{where}: 'image' must be a file path (or a list of them), got {rel!r}")
    first = (root / rel).resolve()
    stem, ending = _strip(first.name), _ending(first.name)
    if re.search(r"_0000$", stem) and n_channels > 1:
        base = stem[:-5]
        return [first.with_name(f"{base}_{c:04d}{ending}") for c in range(n_channels)]
    return [first]


def _case_name(label: Path | None, first_image: Path) -> str:
    if label is not None:
        return _strip(label.name)
    return re.sub(r"_\d{4}$", "", _strip(first_image.name))


def _parse_entries(root: Path, raw: Any, key: str, n_channels: int, where: Path) -> list[Case]:
    if not isinstance(raw, list):
        raise UserError(f"{where}: '{key}' must be a list of cases, got {type(raw).__name__}")
    cases = []
    for i, entry in enumerate(raw):
        if isinstance(entry, str):  # MSD test list: bare image paths
            entry = {"image": entry}
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise UserError(f"{where}: '{key}' entry {i} must be an object with 'image' (and 'label'), got {entry!r}")
        images = _channel_files(root, entry["image"], n_channels, where)
        label_rel = entry.get("label")
        if key != "test" and not label_rel:
            raise UserError(f"{where}: '{key}' entry {i} ({entry['image']}) has no 'label'")
        if label_rel is not None and not isinstance(label_rel, str):
            raise UserError(f"{where}: '{key}' entry {i}: 'label' must be a file path, got {label_rel!r}")
        label = (root / label_rel).resolve() if label_rel else None
        cases.append(Case(_case_name(label, images[0]), images, label))
    return cases


def _discover(root: Path, n_channels: int, ending: str, where: Path) -> list[Case]:
    """nnU-Net v2 without a 'training' list: cases are ``labelsTr/<case><ending>``."""
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise UserError(f"{where}: no 'training' list and no labelsTr/ folder to discover cases from")
    cases = []
    for lab in sorted(labels_dir.glob(f"*{ending}")):
        name = _strip(lab.name)
        images = [root / "imagesTr" / f"{name}_{c:04d}{ending}" for c in range(n_channels)]
        cases.append(Case(name, images, lab))
    if not cases:
        raise UserError(f"{where}: no 'training' list and no *{ending} files in {labels_dir}")
    return cases


def _holdout(cases: list[Case]) -> tuple[list[Case], list[Case]]:
    """Deterministic 20% validation split, ordered by a hash of the case names."""
    if len(cases) < 2:
        return cases, []
    n_val = max(1, math.floor(HOLDOUT_FRACTION * len(cases) + 0.5))
    ranked = sorted(cases, key=lambda c: hashlib.sha1(c.name.encode()).hexdigest())
    val = {c.name for c in ranked[:n_val]}
    return [c for c in cases if c.name not in val], [c for c in cases if c.name in val]


def _infer_spatial_dims(meta: Mapping[str, Any], cases: Sequence[Case], where: Path) -> int:
    explicit = meta.get("spatial_dims")
    if explicit is not None:
        if explicit not in (2, 3):
            raise UserError(f"{where}: 'spatial_dims' must be 2 or 3, got {explicit!r}")
        return int(explicit)
    size = str(meta.get("tensorImageSize", "")).upper()
    if size == "2D":
        return 2
    if size in ("3D", "4D"):
        return 3
    from .nifti import load_header  # no hint: look at the first image's header

    shape = load_header(cases[0].images[0], case=cases[0].name).shape
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3


def read_task(root: str | os.PathLike[str]) -> TaskInfo:
    """Read and check ``dataset.json`` of a task folder (or the file itself).

    Raises:
        UserError: missing folder or ``dataset.json``, invalid JSON, missing or malformed keys,
            duplicate case names, or files listed but missing (the message names them).

    Examples:
        >>> info = read_task("data/medseg")
        >>> info.spatial_dims, info.labels, len(info.training)
        (3, {0: 'background', 1: 'sphere'}, 16)
    """
    path = Path(root)
    if path.is_dir():
        path = path / "dataset.json"
        if not path.is_file():
            raise UserError(f"no dataset.json in task folder {path.parent}")
    elif not path.is_file():
        raise UserError(f"task folder (or its dataset.json) not found: {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(meta, Mapping):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(meta).__name__}")
    folder = path.parent.resolve()
    labels = _parse_labels(meta.get("labels"), path)
    channels = _parse_channels(meta, path)
    ending = str(meta.get("file_ending", ".nii.gz"))
    if "training" in meta:
        training = _parse_entries(folder, meta["training"], "training", len(channels), path)
    else:
        training = _discover(folder, len(channels), ending, path)
    if not training:
        raise UserError(f"{path}: 'training' is empty")
    if "validation" in meta:
        validation = _parse_entries(folder, meta["validation"], "validation", len(channels), path)
    else:
        training, validation = _holdout(training)
    test = _parse_entries(folder, meta.get("test", []), "test", len(channels), path)
    for c in test:
        if c.label is None:
            guess = folder / "labelsTs" / f"{c.name}{_ending(c.images[0].name)}"
            c.label = guess if guess.is_file() else None

    seen: dict[str, str] = {}
    for split, cases in (("training", training), ("validation", validation), ("test", test)):
        for c in cases:
            if c.name in seen:
                raise UserError(f"{path}: case {c.name!r} appears twice (in '{seen[c.name]}' and '{split}')")
            seen[c.name] = split
            missing = [p for p in [*c.images, *([c.label] if c.label else [])] if not p.is_file()]
            if missing:
                shown = ", ".join(str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in missing[:3])
                raise UserError(f"case {c.name!r} ({split}): missing file(s) {shown} listed in {path}")
    name = str(meta.get("name", folder.name))
    spatial_dims = _infer_spatial_dims(meta, training, path)
    return TaskInfo(folder, name, spatial_dims, labels, channels, training, validation, test)


def _header_check(info: TaskInfo, case: Case) -> None:
    from .nifti import short_name, load_header

    n_ch = len(info.channel_names)
    shapes = []
    for p in case.images:
        shape = tuple(load_header(p, case=case.name).shape)
        if info.spatial_dims == 2 and len(shape) >= 3 and shape[2] == 1:
            shape = shape[:2] + shape[3:]
        shapes.append(shape)
    d = info.spatial_dims
    if len(case.images) == 1 and len(shapes[0]) == d + 1:
        spatial, got = shapes[0][:d], shapes[0][d]
    elif all(len(s) == d for s in shapes):
        spatial, got = shapes[0], len(case.images)
        for p, s in zip(case.images[1:], shapes[1:]):
            if s != spatial:
                raise UserError(f"case {case.name!r}: channel file {short_name(p)} has shape {s}, expected {spatial}")
    else:
        raise UserError(
            f"case {case.name!r}: image {short_name(case.images[0])} has shape {shapes[0]}, expected a {d}D volume "
            f"(or {d}D plus one axis of {n_ch} channels)"
        )
    if got != n_ch:
        raise UserError(
            f"case {case.name!r}: {got} image channel(s) but dataset.json has {n_ch} channel_names {info.channel_names}"
        )
    if case.label is not None:
        lshape = tuple(load_header(case.label, case=case.name).shape)
        if d == 2 and len(lshape) == 3 and lshape[2] == 1:
            lshape = lshape[:2]
        if lshape != spatial:
            raise UserError(
                f"case {case.name!r}: label {short_name(case.label)} has shape {lshape} but image "
                f"{short_name(case.images[0])} has spatial shape {spatial}"
            )


def check_task(info: TaskInfo, *, deep: bool = True, splits: Sequence[str] = SPLITS) -> None:
    """Check every case of ``splits``: channel count, image vs label shape (headers); with ``deep``
    also read all data (corrupt/truncated files) and the label values.

    Raises:
        UserError: one line naming the first bad case and file.
    """
    from .nifti import check_label_values, load_data, read_image

    label_values = list(info.labels)
    for split in splits:
        for case in info.split(split):
            _header_check(info, case)
            if deep:
                read_image(case.images, case=case.name, spatial_dims=info.spatial_dims, channels=len(info.channel_names))
                if case.label is not None:
                    data, _ = load_data(case.label, case=case.name)
                    check_label_values(np.unique(data), case=case.name, path=case.label, labels=label_values)
