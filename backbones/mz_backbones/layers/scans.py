"""Scan strategies: how a mixer turns a grid of tokens into K sequences and back.

Each strategy wraps the cached permutations of :mod:`mz_kernels.scan_orders`:
``scan(x [B, L, C], grid) -> [B, L', K, C]`` and the adjoint ``merge(y [B, L', K, C], grid) -> [B, L, C]``
(sum over directions). ``grid`` is the token grid: ``(L,)``, ``(H, W)`` or ``(D, H, W)``
(``(T, H, W)`` for video).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

import mz_kernels as mk


class ScanStrategy:
    """Base class: ``num_dirs`` directions over grids of ``spatial_dims`` dims (0 = any)."""

    num_dirs: int = 1
    spatial_dims: tuple[int, ...] = (1, 2, 3)
    #: direction k as ``"fwd"`` (raster order) or ``"rev"`` (raster reversed) when every direction is
    #: one of those two, which lets a mixer stream the sequence in pieces; ``None`` otherwise
    stream_dirs: tuple[str, ...] | None = None

    def _check(self, grid: Sequence[int], x: Tensor) -> None:
        if len(grid) not in self.spatial_dims:
            raise ValueError(f"{type(self).__name__}: grid must have {self.spatial_dims} dims, got {tuple(grid)}")
        if math.prod(grid) != x.shape[1]:
            raise ValueError(f"{type(self).__name__}: {x.shape[1]} tokens do not form grid {tuple(grid)}")

    def scan(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def merge(self, y: Tensor, grid: Sequence[int]) -> Tensor:
        raise NotImplementedError


def _as_rows(grid: Sequence[int]) -> tuple[int, int]:
    return 1, math.prod(grid)


class Unidirectional(ScanStrategy):
    """Raster order only (K=1)."""

    num_dirs = 1
    stream_dirs = ("fwd",)

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.cross_scan_2d(x, *_as_rows(grid), mode="uni")

    def merge(self, y, grid):
        return mk.cross_merge_2d(y, *_as_rows(grid), mode="uni")


class Bidirectional(ScanStrategy):
    """Raster order and its reverse (K=2): Vim, VideoMamba, the 1D sequence encoder."""

    num_dirs = 2
    stream_dirs = ("fwd", "rev")

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.cross_scan_2d(x, *_as_rows(grid), mode="bi")

    def merge(self, y, grid):
        return mk.cross_merge_2d(y, *_as_rows(grid), mode="bi")


class Cross2D(ScanStrategy):
    """VMamba SS2D: row-major, column-major and both reversed (K=4), or ``mode="bi"``/``"uni"``."""

    spatial_dims = (2,)

    def __init__(self, mode: str = "cross4"):
        if mode not in mk.CROSS_MODES:
            raise ValueError(f"Cross2D: mode must be one of {list(mk.CROSS_MODES)}, got {mode!r}")
        self.mode = mode
        self.num_dirs = {"cross4": 4, "bi": 2, "uni": 1}[mode]

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.cross_scan_2d(x, *grid, mode=self.mode)

    def merge(self, y, grid):
        return mk.cross_merge_2d(y, *grid, mode=self.mode)


class TriOriented3D(ScanStrategy):
    """SegMamba ToM: forward, reverse and inter-slice (K=3); the slice count comes from the grid."""

    num_dirs = 3
    spatial_dims = (3,)

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.tri_scan_3d(x, *grid)

    def merge(self, y, grid):
        return mk.tri_merge_3d(y, *grid)


class Zigzag2D(ScanStrategy):
    """PlainMamba continuous snake routes (K = routes); ``direction_ids(grid)`` gives ``[K, L]`` move ids."""

    spatial_dims = (2,)

    def __init__(self, routes: int = 4):
        self.num_dirs = routes
        self.routes = routes

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.zigzag_scan_2d(x, *grid, routes=self.routes)

    def merge(self, y, grid):
        return mk.zigzag_merge_2d(y, *grid, routes=self.routes)

    def direction_ids(self, grid: Sequence[int], device=None) -> Tensor:
        return mk.zigzag_direction_ids(*grid, routes=self.routes, device=device)


class Local2D(ScanStrategy):
    """LocalMamba: K directions, each ``(window or None, column_first, flip)``."""

    spatial_dims = (2,)

    def __init__(self, directions: Sequence[tuple[int | None, bool, bool]]):
        self.directions = tuple(tuple(d) for d in directions)
        self.num_dirs = len(self.directions)

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.local_scan_2d(x, *grid, self.directions)

    def merge(self, y, grid):
        return mk.local_merge_2d(y, *grid, self.directions)


class Skip2D(ScanStrategy):
    """EfficientVMamba skip-sampled scan: stride^2 interleaved sub-grids, one direction each."""

    spatial_dims = (2,)

    def __init__(self, stride: int = 2):
        self.stride = stride
        self.num_dirs = stride * stride

    def scan(self, x, grid):
        self._check(grid, x)
        return mk.skip_scan_2d(x, *grid, stride=self.stride)

    def merge(self, y, grid):
        return mk.skip_merge_2d(y, *grid, stride=self.stride)
