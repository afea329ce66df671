"""SegMamba tri-orientated scan (ToM) of a D x H x W volume, tokens in ``d*H*W + h*W + w`` order.

Directions along K:

- 0 forward: raster order;
- 1 reverse: raster order reversed;
- 2 inter-slice: the slice index d varies fastest, i.e. in-slice position 0 of every slice, then
  position 1 of every slice, ... (SegMamba's ``nslices`` chunks interleaved). The slice count is
  the volume's actual D, never a constant.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _index
from ._checks import check_scanned, check_size, check_tokens


def _build(D: int, H: int, W: int, *, device: torch.device) -> _index.ScanIndex:
    raster = torch.arange(D * H * W, device=device)
    inter_slice = raster.view(D, H * W).t().reshape(-1)
    order = torch.stack([raster, raster.flip(0), inter_slice])
    return _index.make_index(order, D * H * W, index_holes=False, inverse_holes=False)


def _args(op: str, D: int, H: int, W: int) -> None:
    check_size(op, "D", D)
    check_size(op, "H", H)
    check_size(op, "W", W)


def tri_scan_3d(x: Tensor, D: int, H: int, W: int) -> Tensor:
    """Forward, reverse and inter-slice orders of a volume in one call (SegMamba ToM).

    Args:
        x: tokens [B, L, C] of a row-major volume, L = D*H*W (D slowest).
        D, H, W: volume depth (number of slices), height and width.

    Returns:
        [B, L, 3, C], contiguous (``.reshape(B, L, 3 * C)`` is free).

    Examples:
        >>> y = tri_scan_3d(torch.randn(1, 3 * 5 * 2, 8), 3, 5, 2)   # [1, 30, 3, 8]
        >>> tri_merge_3d(y, 3, 5, 2).shape
        torch.Size([1, 30, 8])
    """
    _args("tri_scan_3d", D, H, W)
    x = check_tokens("tri_scan_3d", "x", x, D * H * W, "D*H*W = {}*{}*{}", D, H, W)
    return _index.scan(x, _index.cached(_build, D, H, W, device=x.device))


def tri_merge_3d(y: Tensor, D: int, H: int, W: int) -> Tensor:
    """Un-permute the three directions of :func:`tri_scan_3d` and sum them (its exact adjoint).

    Args:
        y: [B, L, 3, C] in scan order.
        D, H, W: as passed to :func:`tri_scan_3d`.

    Returns:
        [B, L, C] in row-major volume order.
    """
    _args("tri_merge_3d", D, H, W)
    y = check_scanned("tri_merge_3d", "y", y, D * H * W, 3, "L' = D*H*W = {}*{}*{}, K = 3", D, H, W)
    return _index.merge(y, _index.cached(_build, D, H, W, device=y.device))
