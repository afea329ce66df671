"""Datasets of a task: random training patches and whole preprocessed volumes.

Both read every case once with :mod:`.nifti` (so bad files give one :class:`UserError` naming the
case), run the deterministic preprocessing of :mod:`.transforms` and keep the result in memory.
:class:`PatchDataset` then draws a random patch per item from an RNG seeded by
``(seed, epoch, index)``: the same index gives the same patch within an epoch, whatever the order
or the worker that asks for it, so runs are reproducible and resumable.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mz_kernels._validate import check_positive_int

from .dataset_json import Case
from .nifti import read_image, read_label
from .transforms import augment_transforms, preprocess_transforms, to_meta

_MIX = 0x9E3779B1


def _load_case(case: Case, *, spatial_dims: int, channels: int | None, labels: Sequence[int]) -> dict[str, Any]:
    image = read_image(case.images, case=case.name, spatial_dims=spatial_dims, channels=channels)
    item: dict[str, Any] = {"image": to_meta(image.array, image.affine)}
    if case.label is not None:
        label = read_label(case.label, case=case.name, labels=labels, spatial_dims=spatial_dims)
        if label.spatial_shape != image.spatial_shape:
            from mz_pipelines.runtime.errors import UserError

            raise UserError(
                f"case {case.name!r}: label shape {label.spatial_shape} differs from image shape {image.spatial_shape}"
            )
        item["label"] = to_meta(label.array.astype(np.float32), image.affine)
    return item


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor from a MetaTensor (collates without metadata) or array."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _spacing_of(meta_tensor: Any, spatial_dims: int) -> tuple[float, ...]:
    aff = np.asarray(meta_tensor.affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(aff[:3, :spatial_dims], axis=0))


class PatchDataset(Dataset):
    """Random training patches, ``n_cases * patches_per_case`` items.

    Item ``i`` comes from case ``i // patches_per_case``: ``{"image": [C, *roi] float32,
    "label": [1, *roi] int64}``; the patch centre is foreground with probability ``pos / (pos + neg)``
    and any background voxel otherwise (so some patches contain no foreground).

    Args:
        cases: labeled cases (e.g. ``TaskInfo.training``).
        spatial_dims: 2 or 3.
        roi: patch size per spatial axis.
        spacing: resample to this voxel size (mm) or ``None`` to keep it.
        intensity: ``"zscore"``, ``"ct:A,B"`` or ``"none"``.
        labels: allowed label values (``TaskInfo.labels`` keys).
        channels: expected image channels (``None``: any, but the same for all cases).
        pos, neg: foreground / background centre weights.
        patches_per_case: items per case per epoch.
        seed: base seed of the patch RNG.
        flip_prob: probability of a flip per spatial axis.

    Examples:
        >>> ds = PatchDataset(info.training, spatial_dims=3, roi=(32, 32, 32), spacing=None,
        ...                   intensity="zscore", labels=list(info.labels))
        >>> ds[0]["image"].shape
        torch.Size([1, 32, 32, 32])
    """

    def __init__(
        self,
        cases: Sequence[Case],
        *,
        spatial_dims: int,
        roi: Sequence[int],
        spacing: Sequence[float] | None,
        intensity: str,
        labels: Sequence[int],
        channels: int | None = None,
        pos: float = 1.0,
        neg: float = 1.0,
        patches_per_case: int = 16,
        seed: int = 0,
        flip_prob: float = 0.2,
    ) -> None:
        if not cases:
            raise ValueError("PatchDataset: cases must not be empty")
        check_positive_int("PatchDataset", "patches_per_case", patches_per_case)
        unlabeled = [c.name for c in cases if c.label is None]
        if unlabeled:
            raise ValueError(f"PatchDataset: every case needs a label, got none for {unlabeled[:3]}")
        self.roi = tuple(roi)
        spacing_t = tuple(spacing) if spacing else None
        pre = preprocess_transforms(spatial_dims=spatial_dims, spacing=spacing_t, intensity=intensity, roi=self.roi)
        self._augment = augment_transforms(spatial_dims=spatial_dims, roi=self.roi, pos=pos, neg=neg, flip_prob=flip_prob)
        self.case_names = [c.name for c in cases]
        self.patches_per_case, self.seed, self.epoch = patches_per_case, int(seed), 0
        self._volumes: list[dict[str, Any]] = []
        for c in cases:
            out = pre(_load_case(c, spatial_dims=spatial_dims, channels=channels, labels=labels))
            self._volumes.append({"image": out["image"], "label": out["label"]})

    def __len__(self) -> int:
        return len(self._volumes) * self.patches_per_case

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the patch seeds (call once per epoch for fresh patches every epoch)."""
        self.epoch = int(epoch)

    def item_seed(self, index: int) -> int:
        """The RNG seed of item ``index`` in the current epoch."""
        return int(np.random.SeedSequence([self.seed, self.epoch, index, _MIX]).generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"PatchDataset: index {index} out of range [0, {len(self)})")
        volume = self._volumes[index // self.patches_per_case]
        self._augment.set_random_state(seed=self.item_seed(index))
        patch = self._augment({"image": volume["image"], "label": volume["label"]})[0]
        image, label = _plain(patch["image"]), _plain(patch["label"])
        return {"image": image.float().contiguous(), "label": label.round().long().contiguous()}


class VolumeDataset(Dataset):
    """Whole preprocessed volumes for evaluation (orientation RAS, optional resampling, intensity).

    Items: ``{"image": [C, *S] float32, "label": [1, *S] int64 (labeled cases only), "case": str,
    "spacing": tuple of floats}`` where ``spacing`` is the preprocessed voxel size in mm (for HD95/ASSD).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        *,
        spatial_dims: int,
        spacing: Sequence[float] | None,
        intensity: str,
        labels: Sequence[int],
        channels: int | None = None,
    ) -> None:
        self._items: list[dict[str, Any]] = []
        spacing_t = tuple(spacing) if spacing else None
        for c in cases:
            pre = preprocess_transforms(
                spatial_dims=spatial_dims, spacing=spacing_t, intensity=intensity, roi=None, with_label=c.label is not None
            )
            out = pre(_load_case(c, spatial_dims=spatial_dims, channels=channels, labels=labels))
            item: dict[str, Any] = {
                "image": _plain(out["image"]).float().contiguous(),
                "case": c.name,
                "spacing": _spacing_of(out["image"], spatial_dims),
            }
            if "label" in out:
                item["label"] = _plain(out["label"]).round().long().contiguous()
            self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._items[index])
