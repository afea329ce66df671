"""Scan orders: cached token permutations of 1D/2D/3D grids with exact inverses and adjoint merges.

Multi-direction scans return ``[B, L', K, C]`` (contiguous: ``.reshape(B, L', K * C)`` is free and
channel ``k*C + c`` falls into selective-scan group ``k``); their merges take it back to the grid
``[B, L, C]`` by un-permuting each direction and summing over K. Single-direction scans return
``[B, L', C]`` and their merge is the inverse. Every order is built once per (sizes, params,
device), and all data movement goes through two ``torch.library`` ops (``mz::gather_tokens``,
``mz::scatter_tokens``), so scans trace under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from .atrous2d import atrous_merge_2d, atrous_scan_2d, skip_merge_2d, skip_scan_2d
from .cross2d import CROSS_MODES, CrossMode, cross_merge_2d, cross_scan_2d
from .orders1d import flip
from .spatiotemporal import SPATIOTEMPORAL_ORDERS, SpatiotemporalOrder, spatiotemporal_merge, spatiotemporal_scan
from .tokens import gather_tokens, scatter_tokens
from .tri3d import tri_merge_3d, tri_scan_3d
from .window2d import LocalDirection, local_merge_2d, local_scan_2d, local_scan_length, window_merge_2d, window_scan_2d
from .zigzag2d import DIRECTION_NAMES as ZIGZAG_DIRECTION_NAMES
from .zigzag2d import zigzag_direction_ids, zigzag_merge_2d, zigzag_scan_2d

__all__ = [
    "CROSS_MODES",
    "SPATIOTEMPORAL_ORDERS",
    "ZIGZAG_DIRECTION_NAMES",
    "CrossMode",
    "LocalDirection",
    "SpatiotemporalOrder",
    "atrous_merge_2d",
    "atrous_scan_2d",
    "cross_merge_2d",
    "cross_scan_2d",
    "flip",
    "gather_tokens",
    "local_merge_2d",
    "local_scan_2d",
    "local_scan_length",
    "scatter_tokens",
    "skip_merge_2d",
    "skip_scan_2d",
    "spatiotemporal_merge",
    "spatiotemporal_scan",
    "tri_merge_3d",
    "tri_scan_3d",
    "window_merge_2d",
    "window_scan_2d",
    "zigzag_direction_ids",
    "zigzag_merge_2d",
    "zigzag_scan_2d",
]
