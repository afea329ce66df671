"""Segmentation networks by name: ``build_model("segmamba", spatial_dims=3, in_channels=1, out_channels=2)``.

Each entry of :data:`MODELS` names the class (imported only when built, so MONAI loads lazily), the
spatial dims it supports, its presets (``tiny`` for CPU tests and quick runs, ``full`` for the
published sizes) and how its stride follows from its arguments (:func:`input_multiple`).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class ModelSpec:
    """One registered network.

    Attributes:
        name: registry name.
        target: ``"module:Class"`` relative to this package (e.g. ``".segmamba:SegMambaNet"``).
        spatial_dims: the dimensionalities it supports.
        presets: keyword arguments per preset name.
        stride: ``stride(kwargs) -> int``, the multiple every spatial input size must be, from the
            resolved constructor arguments.
        summary: one line for listings.
    """

    name: str
    target: str
    spatial_dims: tuple[int, ...]
    presets: Mapping[str, Mapping[str, Any]]
    stride: Callable[[Mapping[str, Any]], int]
    summary: str = ""

    def cls(self) -> type[nn.Module]:
        """The model class (imports its module)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module, package=__package__), attr)


MODELS: dict[str, ModelSpec] = {
    "segmamba": ModelSpec(
        "segmamba", ".segmamba:SegMambaNet", (3,),
        {
            "tiny": dict(feature_size=(8, 16, 32), depths=(1, 1, 1), hidden_size=64, d_state=4, expand=1.0),
            "full": dict(feature_size=48, depths=(2, 2, 2, 2), hidden_size=768, d_state=16, expand=2.0),
        },
        lambda kw: 2 ** len(kw.get("depths", (2, 2, 2, 2))),
        "SegMamba-style: GSC + tri-orientated Mamba encoder, UNETR decoder (3D)",
    ),
    "umamba_bot": ModelSpec(
        "umamba_bot", ".umamba:UMambaBot", (2, 3),
        {
            "tiny": dict(features=(8, 16, 32, 32), blocks=1, d_state=4, expand=1.0),
            "full": dict(features=(32, 64, 128, 256, 320, 320), blocks=2, d_state=16, expand=2.0),
        },
        lambda kw: 2 ** (len(kw.get("features", (32, 64, 128, 256, 320, 320))) - 1),
        "U-Mamba-Bot-style: residual conv U-Net with a Mamba layer at the bottleneck (2D/3D)",
    ),
    "vmunet": ModelSpec(
        "vmunet", ".vmunet:VMUNet", (2,),
        {
            "tiny": dict(dims=16, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1), d_state=4, ssm_ratio=1.0),
            "full": dict(dims=96, depths=(2, 2, 2, 2), decoder_depths=(2, 2, 2, 1), d_state=16, ssm_ratio=2.0),
        },
        lambda kw: 32,
        "VM-UNet-style: VMamba v0 encoder, VSS-block decoder with patch expanding (2D)",
    ),
    "msvmunet": ModelSpec(
        "msvmunet", ".vmunet:MSVMUNet", (2,),
        {
            "tiny": dict(dims=16, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1), d_state=1, ssm_ratio=1.0),
            "full": dict(dims=96, depths=(2, 2, 8, 2), decoder_depths=(2, 2, 2, 2), d_state=1, ssm_ratio=1.0),
        },
        lambda kw: 32,
        "MSVM-UNet-style: VMamba v2 encoder, multi-scale VSS decoder, LKPE/FLKPE expansion (2D)",
    ),
    "unet": ModelSpec(
        "unet", ".baselines:UNet", (2, 3),
        {
            "tiny": dict(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1),
            "full": dict(channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2),
        },
        lambda kw: math.prod(kw.get("strides", (2, 2, 2, 2))),
        "MONAI UNet baseline (2D/3D)",
    ),
    "segresnet": ModelSpec(
        "segresnet", ".baselines:SegResNet", (2, 3),
        {
            "tiny": dict(init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)),
            "full": dict(init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)),
        },
        lambda kw: 2 ** (len(kw.get("blocks_down", (1, 2, 2, 4))) - 1),
        "MONAI SegResNet baseline (2D/3D)",
    ),
    "swinunetr": ModelSpec(
        "swinunetr", ".baselines:SwinUNETR", (2, 3),
        {
            "tiny": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
            "full": dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)),
        },
        lambda kw: 32,
        "MONAI SwinUNETR baseline (2D/3D), inputs divisible by 32",
    ),
}


def _spec(op: str, name: object, spatial_dims: object, preset: object) -> ModelSpec:
    if not isinstance(name, str) or name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{op}: unknown model {name!r}, expected one of {sorted(MODELS)}{hint}")
    spec = MODELS[name]
    if spatial_dims not in spec.spatial_dims:
        raise ValueError(f"{op}: model {name!r} supports spatial_dims {list(spec.spatial_dims)}, got {spatial_dims!r}")
    if preset not in spec.presets:
        raise ValueError(f"{op}: preset must be one of {sorted(spec.presets)} for model {name!r}, got {preset!r}")
    return spec


def _check_overrides(op: str, spec: ModelSpec, overrides: Mapping[str, Any]) -> None:
    params = inspect.signature(spec.cls().__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("self", "spatial_dims", "in_channels", "out_channels")]
    for key in overrides:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; expected one of {allowed}"
            raise ValueError(f"{op}: unknown argument {key!r} for model {spec.name!r}{hint}")


def resolved_kwargs(name: str, *, spatial_dims: int, preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The constructor keyword arguments ``build_model`` would use (preset merged with ``overrides``),
    without ``spatial_dims`` / ``in_channels`` / ``out_channels``."""
    spec = _spec("build_model", name, spatial_dims, preset)
    _check_overrides("build_model", spec, overrides)
    return {**spec.presets[preset], **overrides}


def build_model(
    name: str, *, spatial_dims: int, in_channels: int, out_channels: int, preset: str = "tiny", **overrides: Any
) -> nn.Module:
    """Build a registered network: ``forward(x [B, in_channels, *S]) -> logits [B, out_channels, *S]``.

    Args:
        name: one of :data:`MODELS` (``segmamba``, ``umamba_bot``, ``vmunet``, ``msvmunet``, ``unet``,
            ``segresnet``, ``swinunetr``).
        spatial_dims: 2 or 3 (must be supported by the model).
        in_channels, out_channels: input modalities; classes including background.
        preset: ``"tiny"`` (CPU-sized) or ``"full"`` (published sizes).
        **overrides: constructor arguments replacing the preset's (e.g. ``feature_size=24``).

    Raises:
        ValueError: unknown name (with close matches), unsupported ``spatial_dims``, unknown preset,
            unknown or invalid override.

    Examples:
        >>> net = build_model("segmamba", spatial_dims=3, in_channels=1, out_channels=2)
        >>> net(torch.randn(1, 1, 32, 48, 16)).shape
        torch.Size([1, 2, 32, 48, 16])
    """
    kwargs = resolved_kwargs(name, spatial_dims=spatial_dims, preset=preset, **overrides)
    for arg, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"build_model: {arg} must be a positive int, got {v!r}")
    try:
        return MODELS[name].cls()(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    except (TypeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"build_model: invalid arguments for model {name!r} ({kwargs}): {first}") from None


def input_multiple(name: str, spatial_dims: int, preset: str = "tiny", **overrides: Any) -> int:
    """The stride every spatial input size of ``build_model(name, ...)`` must be a multiple of.

    Examples:
        >>> input_multiple("segmamba", 3, "full")
        16
    """
    kwargs = resolved_kwargs(name, spatial_dims=spatial_dims, preset=preset, **overrides)
    return int(MODELS[name].stride(kwargs))


def check_model_input(op: str, x: object, *, in_channels: int, spatial_dims: int, multiple: int) -> None:
    """ValueError unless ``x`` is ``[B, in_channels, *S]`` with ``spatial_dims`` sizes, each a positive
    multiple of ``multiple`` (the network's stride)."""
    want = spatial_dims + 2
    axes = "B, C, " + ", ".join("DHW"[3 - spatial_dims :])
    if not isinstance(x, Tensor) or x.dim() != want:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: input must be [{axes}] ({want} dims), got {got}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{op}: input must have {in_channels} channels (in_channels), got {x.shape[1]} (shape {tuple(x.shape)})")
    sizes = tuple(x.shape[2:])
    if any(s < multiple or s % multiple for s in sizes):
        raise ValueError(
            f"{op}: spatial size {sizes} must be a positive multiple of {multiple} in every axis (the model's stride); "
            "pad or crop the input, or use sliding-window inference"
        )
