"""Small layers shared by the families: drop path, MLP, channel-first norms, position-embedding resize,
and dimension-generic factories keyed by ``spatial_dims`` (1, 2, 3)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCENORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def check_spatial_dims(name: str, spatial_dims: int, allowed: tuple[int, ...] = (1, 2, 3)) -> int:
    if spatial_dims not in allowed:
        raise ValueError(f"{name}: spatial_dims must be one of {list(allowed)}, got {spatial_dims!r}")
    return spatial_dims


def run_checkpointed(enabled: bool, block: Callable[..., Tensor], *args: Any) -> Tensor:
    """``block(*args)``, through (non-reentrant) activation checkpointing when ``enabled`` and
    gradients are on: only the inputs are kept and the block runs again in the backward pass.
    Callers pass ``enabled = <their checkpointing switch> and self.training``."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    """Linear -> activation -> Linear on the last dim."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of a channel-first map ``[B, C, *spatial]``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def to_channels_last(x: Tensor) -> Tensor:
    """``[B, C, *spatial]`` -> ``[B, *spatial, C]``."""
    return x.movedim(1, -1)


def to_channels_first(x: Tensor) -> Tensor:
    """``[B, *spatial, C]`` -> ``[B, C, *spatial]``."""
    return x.movedim(-1, 1)


def resample_pos_embed(pos: Tensor, new_grid: tuple[int, ...], old_grid: tuple[int, ...], num_prefix: int = 0) -> Tensor:
    """Resize a learned position embedding ``[1, num_prefix + prod(old_grid), C]`` to ``new_grid``
    (bicubic in 2D, trilinear in 3D, linear in 1D); prefix tokens (cls) are kept as they are."""
    if tuple(new_grid) == tuple(old_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    C = grid.shape[-1]
    if grid.shape[1] != math.prod(old_grid):
        raise ValueError(f"resample_pos_embed: {grid.shape[1]} grid tokens do not form grid {tuple(old_grid)}")
    mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[len(old_grid)]
    g = grid.reshape(1, *old_grid, C).movedim(-1, 1).float()
    g = F.interpolate(g, size=tuple(new_grid), mode=mode, align_corners=False)
    g = g.movedim(1, -1).reshape(1, -1, C).to(pos.dtype)
    return torch.cat([prefix, g], dim=1)
