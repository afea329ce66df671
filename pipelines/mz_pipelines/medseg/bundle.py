"""Export a trained network as a MONAI bundle, and the small evaluator its inference config runs.

Layout (MONAI bundle spec)::

    <out>/configs/metadata.json    version, monai/pytorch versions, task, network_data_format
    <out>/configs/inference.json   network_def (our class by import path), preprocessing, inferer,
                                   postprocessing (softmax, argmax, Invertd, SaveImaged), evaluator, run
    <out>/models/model.pt          the state dict
    <out>/docs/README.md           how to run it

Run it with MONAI's bundle runner (``mambazoo[medseg]`` must be installed: the network class lives
in ``mz_pipelines``)::

    python -c "from monai.bundle import run; run(config_file='configs/inference.json', \\
        meta_file='configs/metadata.json', bundle_root='.', dataset_dir='in/', output_dir='out/')"

(``python -m monai.bundle run ...`` does the same when the ``fire`` package is installed.)
MONAI's stock bundles use ignite's ``SupervisedEvaluator``; :class:`BundleEvaluator` is an
ignite-free loop with the same role, so the bundle runs with MONAI's core install.
"""
from __future__ import annotations

import json
import os
import pydoc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mz_pipelines.runtime.files import atomic_open, atomic_write_text, write_json

from .config import check_intensity

_OP = "export_bundle"
BUNDLE_VERSION = "0.1.0"


class BundleEvaluator:
    """Run sliding-window inference over a dataset and post-process each item (the bundle's ``evaluator``).

    For each item ``{"image": [C, *S] MetaTensor, ...}`` of ``dataset``: ``pred = inferer(image[None],
    network)[0]``, then ``postprocessing({**item, "pred": pred})`` (which inverts the preprocessing
    and saves the mask). The network runs in eval mode under ``torch.no_grad``.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]],
        network: nn.Module,
        inferer: Callable[..., torch.Tensor],
        postprocessing: Callable[[dict[str, Any]], Any],
        device: str | torch.device = "cpu",
    ) -> None:
        self.dataset, self.network, self.inferer = dataset, network, inferer
        self.postprocessing, self.device = postprocessing, torch.device(device)

    def run(self) -> int:
        """Process every item; returns how many were written."""
        self.network.eval()
        n = 0
        with torch.no_grad():
            for item in self.dataset:
                image = item["image"]
                pred = self.inferer(image[None].to(self.device), self.network)[0]
                self.postprocessing({**item, "pred": pred.cpu()})
                n += 1
        return n


class SliceNet(nn.Module):
    """Run a 2D network on ``[B, C, H, W, 1]`` volumes (2D NIfTI kept in 3D geometry); returns ``[B, K, H, W, 1]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[-1] != 1:
            raise ValueError(
                f"SliceNet: x must be [B, C, H, W, 1] (2D NIfTI with a singleton 3rd axis), got {tuple(x.shape)}"
            )
        return self.net(x[..., 0])[..., None]


def _intensity_transforms(intensity: str) -> list[dict[str, Any]]:
    check_intensity(intensity)
    if intensity == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]
    if intensity.startswith("ct:"):
        low, high = (float(v) for v in intensity[3:].split(","))
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high,
                 "b_min": 0.0, "b_max": 1.0, "clip": True}]
    return []


def _datalist_expr(in_channels: int) -> str:
    if in_channels == 1:
        return "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]"
    # nnU-Net naming: <case>_0000.nii.gz, <case>_0001.nii.gz, ... one file per channel, stacked by LoadImaged
    return (
        "$[{'image': [f.replace('_0000.nii', '_%04d.nii' % c) for c in range(@num_channels)]} "
        "for f in sorted(glob.glob(os.path.join(@dataset_dir, '*_0000.nii*')))]"
    )


def inference_config(
    *,
    network_target: str,
    network_kwargs: Mapping[str, Any],
    spatial_dims: int,
    in_channels: int,
    roi: Sequence[int],
    spacing: Sequence[float] | None,
    intensity: str,
    overlap: float,
    sw_batch_size: int = 1,
) -> dict[str, Any]:
    """The ``configs/inference.json`` content (see the module docstring); arguments as in :func:`export_bundle`."""
    pre: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    # 2D: NIfTI files [H, W, 1] keep their 3D geometry (so Invertd restores it); SliceNet squeezes the
    # singleton axis around the 2D network, and windows are [h, w, 1].
    pre.append({"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
                "labels": [["L", "R"], ["P", "A"], ["I", "S"]]})
    if spacing:  # a non-positive pixdim keeps that axis' spacing (the singleton axis in 2D)
        pixdim = [float(s) for s in spacing] + [-1.0] * (3 - spatial_dims)
        pre.append({"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"})
    pre += _intensity_transforms(intensity)
    pre.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return {
        "imports": ["$import glob", "$import os", "$import numpy as np", "$import torch"]
                   + ([] if spatial_dims == 3 else ["$from mz_pipelines.medseg.bundle import SliceNet"]),
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "num_channels": in_channels,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": network_target, **dict(network_kwargs)},
        "network": "$@network_def.to(@device)" if spatial_dims == 3
                   else "$SliceNet(@network_def).to(@device)",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "datalist": _datalist_expr(in_channels),
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(roi) + [1] * (3 - spatial_dims),
                    "sw_batch_size": sw_batch_size,
                    "overlap": float(overlap), "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$np.uint8", "resample": False, "separate_folder": False, "print_log": False},
        ]},
        "evaluator": {"_target_": "mz_pipelines.medseg.bundle.BundleEvaluator", "dataset": "@dataset",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "device": "@device"},
        "initialize": ["$@network_def.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))"],
        "run": ["$@evaluator.run()"],
    }


def _metadata(
    *, spatial_dims: int, in_channels: int, out_channels: int, labels: Mapping[str, str], roi: Sequence[int],
    spacing: Sequence[float] | None, intensity: str, channel_names: Sequence[str] | None, network_target: str,
) -> dict[str, Any]:
    import monai
    import numpy as np

    names = list(channel_names) if channel_names else [f"channel_{i}" for i in range(in_channels)]
    value_range = [0.0, 1.0] if intensity.startswith("ct:") else []
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported by mambazoo"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _pkg_version("nibabel"), "mambazoo": _pkg_version("mambazoo")},
        "task": f"{spatial_dims}D segmentation of {', '.join(v for k, v in labels.items() if str(k) != '0')}",
        "description": f"{network_target.rsplit('.', 1)[-1]} exported by mambazoo; sliding-window inference, "
                       f"masks written in the input geometry",
        "authors": "mambazoo",
        "copyright": "see the mambazoo licence (Apache-2.0)",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "any", "num_channels": in_channels,
                "spatial_shape": list(roi), "dtype": "float32", "value_range": value_range, "is_patch_data": True,
                "channel_def": {str(i): n for i, n in enumerate(names)},
                "preprocessing": {"orientation": "RAS", "spacing_mm": list(spacing) if spacing else None,
                                  "intensity": intensity},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": out_channels,
                "spatial_shape": list(roi), "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {str(k): v for k, v in labels.items()},
            }},
        },
    }


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


_README = """# {name}

MONAI bundle exported by mambazoo: {network} ({spatial_dims}D, {in_channels} input channel(s), labels {labels}).

## Run

Requires `pip install 'mambazoo[medseg]'` (the network class is `{target}`).
Put NIfTI images in a folder ({files}), then from this folder:

    python -c "from monai.bundle import run; run(config_file='configs/inference.json', meta_file='configs/metadata.json', bundle_root='.', dataset_dir='path/to/images', output_dir='path/to/out')"

or, with the `fire` package installed, `python -m monai.bundle run --config_file configs/inference.json
--meta_file configs/metadata.json --bundle_root . --dataset_dir path/to/images --output_dir path/to/out`.
Each input gives `<name>_seg.nii.gz` (uint8 label values) in the input's original shape and affine
(2D inputs `[H, W, 1]` give `[H, W]` masks: MONAI's writer drops trailing singleton axes).

## Pipeline

- preprocessing: load, channel first, orientation RAS, {spacing}, intensity `{intensity}`;
- inference: sliding window, roi {roi}, overlap {overlap}, Gaussian blending;
- postprocessing: softmax, argmax, inverse of the preprocessing (nearest), save.

`models/model.pt` is the state dict; `configs/inference.json#network_def` rebuilds the network
(`monai.bundle.ConfigParser`).
"""


def export_bundle(
    out_dir: str | os.PathLike[str],
    *,
    network_target: str,
    network_kwargs: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    labels: Mapping[str, str],
    roi: Sequence[int],
    spacing: Sequence[float] | None = None,
    intensity: str = "zscore",
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write a MONAI bundle for a trained segmentation network; returns ``out_dir``.

    The network is rebuilt from ``network_target(**network_kwargs)`` and ``state_dict`` is loaded into
    it (strict) before anything is written, so a bundle that cannot load fails here, not at the user's.

    Args:
        out_dir: bundle folder (created; existing bundle files are replaced atomically).
        network_target: import path of the network class, e.g.
            ``"mz_pipelines.medseg.models.segmamba.SegMambaNet"`` or ``"monai.networks.nets.UNet"``.
        network_kwargs: JSON-serialisable constructor kwargs.
        state_dict: the trained weights.
        spatial_dims: 2 or 3. 2D bundles expect NIfTI files ``[H, W, 1]`` (a trailing singleton axis)
            and write ``[H, W]`` masks with the input's affine.
        in_channels, out_channels: network channels (``out_channels`` includes background).
        labels: label value (as str) -> name, ``out_channels`` entries.
        roi: sliding-window size, ``spatial_dims`` ints.
        spacing: resample to this voxel size (mm) before inference; ``None``/empty keeps it.
        intensity: ``"zscore"``, ``"ct:A,B"`` or ``"none"`` (as in training).
        overlap: sliding-window overlap in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        channel_names: input channel names for the metadata (default ``channel_<i>``).

    Examples:
        >>> export_bundle("bundle", network_target="monai.networks.nets.UNet",
        ...               network_kwargs=dict(spatial_dims=3, in_channels=1, out_channels=2,
        ...                                   channels=[8, 16], strides=[2]),
        ...               state_dict=net.state_dict(), spatial_dims=3, in_channels=1, out_channels=2,
        ...               labels={"0": "background", "1": "tumour"}, roi=[32, 32, 32])
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"{_OP}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("sw_batch_size", sw_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{_OP}: {name} must be a positive int, got {v!r}")
    if len(roi) != spatial_dims or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise ValueError(f"{_OP}: roi must be {spatial_dims} positive ints, got {list(roi)}")
    if spacing and (len(spacing) != spatial_dims or min(spacing) <= 0):
        raise ValueError(f"{_OP}: spacing must be empty or {spatial_dims} positive numbers (mm), got {list(spacing)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"{_OP}: overlap must be in [0, 1), got {overlap!r}")
    try:
        check_intensity(intensity)
    except ValueError as e:
        raise ValueError(f"{_OP}: {e}") from None
    label_map = {str(k): str(v) for k, v in labels.items()}
    if len(label_map) != out_channels:
        raise ValueError(f"{_OP}: labels must name all {out_channels} output channels, got {len(label_map)}: {label_map}")
    if channel_names is not None and len(channel_names) != in_channels:
        raise ValueError(f"{_OP}: channel_names must have {in_channels} names, got {list(channel_names)}")
    try:
        json.dumps(dict(network_kwargs))
    except TypeError as e:
        raise ValueError(f"{_OP}: network_kwargs must be JSON-serialisable ({e})") from None
    cls = pydoc.locate(network_target)
    if not callable(cls):
        raise ValueError(f"{_OP}: network_target must be an importable class path, got {network_target!r}")
    net = cls(**network_kwargs)
    weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{_OP}: state_dict does not fit {network_target}(**network_kwargs): {first}") from None

    out = Path(out_dir)
    cfg = inference_config(
        network_target=network_target, network_kwargs=network_kwargs, spatial_dims=spatial_dims,
        in_channels=in_channels, roi=roi, spacing=spacing, intensity=intensity, overlap=overlap,
        sw_batch_size=sw_batch_size,
    )
    meta = _metadata(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, labels=label_map,
        roi=roi, spacing=spacing, intensity=intensity, channel_names=channel_names, network_target=network_target,
    )
    with atomic_open(out / "models" / "model.pt", "wb") as f:
        torch.save(weights, f)
    write_json(out / "configs" / "inference.json", cfg)
    write_json(out / "configs" / "metadata.json", meta)
    atomic_write_text(out / "docs" / "README.md", _README.format(
        name=out.name, network=network_target.rsplit(".", 1)[-1], target=network_target, spatial_dims=spatial_dims,
        in_channels=in_channels, labels=label_map, roi=list(roi), overlap=overlap, intensity=intensity,
        spacing=f"resample to {list(spacing)} mm" if spacing else "native spacing",
        files="`*.nii.gz`" if in_channels == 1 else "`<case>_0000.nii.gz` ... one file per channel",
    ))
    return out
