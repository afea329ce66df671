"""Segmentation networks: SegMamba-style 3D, U-Mamba-Bot 2D/3D, VM-UNet / MSVM-UNet 2D and MONAI baselines.

Build them by name with :func:`build_model` (presets ``tiny`` and ``full``); :func:`input_multiple`
gives the stride inputs must be divisible by; :func:`count_flops` counts FLOPs with the selective
scans included. Model modules (and MONAI) load only when a model is built.
"""
from __future__ import annotations

from .flops import count_flops
from .registry import MODELS, ModelSpec, build_model, check_model_input, input_multiple, resolved_kwargs

__all__ = ["MODELS", "ModelSpec", "build_model", "check_model_input", "count_flops", "input_multiple", "resolved_kwargs"]
