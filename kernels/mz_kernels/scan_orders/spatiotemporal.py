"""VideoMamba token orders of a T x H x W clip, tokens in ``t*H*W + h*W + w`` order."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import _index
from ._checks import check_choice, check_size, check_tokens

SpatiotemporalOrder = Literal["spatial_first", "temporal_first"]
SPATIOTEMPORAL_ORDERS: tuple[str, ...] = ("spatial_first", "temporal_first")


def _build(T: int, H: int, W: int, *, device: torch.device) -> _index.ScanIndex:
    order = torch.arange(T * H * W, device=device).view(T, H * W).t().reshape(1, -1)
    return _index.make_index(order, T * H * W, index_holes=False, inverse_holes=False)


def _args(op: str, T: int, H: int, W: int, order: str) -> None:
    check_size(op, "T", T)
    check_size(op, "H", H)
    check_size(op, "W", W)
    check_choice(op, "order", order, SPATIOTEMPORAL_ORDERS)


def spatiotemporal_scan(x: Tensor, T: int, H: int, W: int, order: SpatiotemporalOrder = "spatial_first") -> Tensor:
    """Order the tokens of a clip for a 1D scan.

    - ``"spatial_first"``: frame by frame, raster inside a frame (``t*H*W + h*W + w``); this is the
      input layout, so ``x`` itself is returned (no copy).
    - ``"temporal_first"``: for each spatial position in raster order, all T frames
      (position ``n*T + t`` holds token ``t*H*W + n``).

    Args:
        x: tokens [B, L, C], L = T*H*W, frames outermost.
        T, H, W: frames, height and width.
        order: ``"spatial_first"`` or ``"temporal_first"``.

    Returns:
        [B, L, C].

    Examples:
        >>> y = spatiotemporal_scan(torch.randn(2, 4 * 3 * 5, 8), 4, 3, 5, order="temporal_first")
        >>> spatiotemporal_merge(y, 4, 3, 5, order="temporal_first").shape
        torch.Size([2, 60, 8])
    """
    _args("spatiotemporal_scan", T, H, W, order)
    x = check_tokens("spatiotemporal_scan", "x", x, T * H * W, "T*H*W = {}*{}*{}", T, H, W)
    if order == "spatial_first":
        return x
    return _index.scan(x, _index.cached(_build, T, H, W, device=x.device)).squeeze(2)


def spatiotemporal_merge(y: Tensor, T: int, H: int, W: int, order: SpatiotemporalOrder = "spatial_first") -> Tensor:
    """Inverse (and adjoint) of :func:`spatiotemporal_scan`: back to ``t*H*W + h*W + w`` order.

    Args:
        y: [B, L, C] in the given ``order``.
        T, H, W, order: as passed to :func:`spatiotemporal_scan`.

    Returns:
        [B, L, C]; ``y`` itself for ``"spatial_first"``.
    """
    _args("spatiotemporal_merge", T, H, W, order)
    y = check_tokens("spatiotemporal_merge", "y", y, T * H * W, "T*H*W = {}*{}*{}", T, H, W)
    if order == "spatial_first":
        return y
    return _index.merge(y.unsqueeze(2), _index.cached(_build, T, H, W, device=y.device))
