"""MONAI baselines (UNet, SegResNet, SwinUNETR) with MONAI's own signatures plus an input check.

Each class subclasses the MONAI network unchanged (same state-dict keys, same arguments) and only
adds ``input_multiple`` and a clear ``ValueError`` for inputs whose size is not a multiple of the
network's stride (MONAI would fail deep inside with a shape error, or silently crop).
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
from monai.networks import nets
from torch import Tensor

from .lean_blocks import set_block_impl
from .registry import check_model_input


class UNet(nets.UNet):
    """MONAI ``UNet(spatial_dims, in_channels, out_channels, channels, strides, ..., num_res_units, norm)``;
    ``[B, in_channels, *S] -> [B, out_channels, *S]``, S multiples of ``prod(strides)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], num_res_units: int = 0, norm: str | tuple = "INSTANCE", **kwargs):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         channels=channels, strides=strides, num_res_units=num_res_units, norm=norm, **kwargs)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.input_multiple = int(math.prod(strides))

    def forward(self, x: Tensor) -> Tensor:
        check_model_input("UNet", x, in_channels=self.in_channels, spatial_dims=self.spatial_dims, multiple=self.input_multiple)
        return super().forward(x)


class SegResNet(nets.SegResNet):
    """MONAI ``SegResNet(spatial_dims, init_filters, in_channels, out_channels, ..., blocks_down, blocks_up)``;
    S multiples of ``2 ** (len(blocks_down) - 1)``."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, init_filters: int = 8,
                 blocks_down: tuple = (1, 2, 2, 4), blocks_up: tuple = (1, 1, 1), **kwargs):
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(
                f"SegResNet: blocks_up must have len(blocks_down) - 1 = {len(blocks_down) - 1} entries, got {blocks_up!r}"
            )
        super().__init__(spatial_dims=spatial_dims, init_filters=init_filters, in_channels=in_channels,
                         out_channels=out_channels, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), **kwargs)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.input_multiple = 2 ** (len(blocks_down) - 1)

    def forward(self, x: Tensor) -> Tensor:
        check_model_input("SegResNet", x, in_channels=self.in_channels, spatial_dims=self.spatial_dims,
                          multiple=self.input_multiple)
        return super().forward(x)


class SwinUNETR(nets.SwinUNETR):
    """MONAI ``SwinUNETR(in_channels, out_channels, patch_size=2, depths, num_heads, ..., feature_size, spatial_dims,
    use_checkpoint)``; S multiples of 32, ``feature_size`` a multiple of 12. ``use_checkpoint``: MONAI's activation
    checkpointing of the Swin blocks. ``block_impl``: ``"monai"`` (default, the stock network) or ``"lean"``
    (its UNETR residual blocks run :mod:`.lean_blocks`, as the SegMamba-style network's do by default), so
    the two can be compared like for like."""

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 24,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 spatial_dims: int = 3, use_checkpoint: bool = False, block_impl: str = "monai", **kwargs):
        if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 12 or feature_size % 12:
            raise ValueError(f"SwinUNETR: feature_size must be a positive multiple of 12, got {feature_size!r}")
        if importlib.util.find_spec("einops") is None:
            raise ValueError("SwinUNETR: MONAI's SwinUNETR needs the einops package (pip install einops)")
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                         depths=depths, num_heads=num_heads, spatial_dims=spatial_dims,
                         use_checkpoint=use_checkpoint, **kwargs)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.input_multiple = 32
        set_block_impl(self, block_impl, op="SwinUNETR")
        self.block_impl = block_impl

    def forward(self, x: Tensor) -> Tensor:
        check_model_input("SwinUNETR", x, in_channels=self.in_channels, spatial_dims=self.spatial_dims, multiple=32)
        y = super().forward(x)
        return y if torch.is_grad_enabled() else y.contiguous()  # lean inference runs channels-last
