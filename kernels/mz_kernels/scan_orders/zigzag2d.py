"""PlainMamba continuous (snake / boustrophedon) routes with per-token direction ids.

Consecutive tokens on a route are always spatial neighbours. Routes, in this order along K:

- 0: rows from the top-left corner (row 0 left->right, row 1 right->left, ...)  [PlainMamba route 1]
- 1: route 0 reversed, i.e. rows from the bottom, start corner set by the parity of H  [route 2]
- 2: columns from the top-left (column 0 down, column 1 up, ...)  [route 3]
- 3: route 2 reversed, i.e. columns from the right, start set by the parity of W  [route 4]
- 4: rows from the top-right (row 0 right->left, row 1 left->right, ...)
- 5: route 4 reversed
- 6: columns from the bottom-left (column 0 up, column 1 down, ...)
- 7: route 6 reversed

``routes=4`` is PlainMamba's set; ``routes=8`` covers all 8 snakes (4 start corners x row/column first).
Direction ids follow PlainMamba's ``direction_Bs`` table: 0 start, 1 right, 2 left, 3 up, 4 down.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _index
from ._checks import check_scanned, check_size, check_tokens

MAX_ROUTES = 8
DIRECTION_NAMES: tuple[str, ...] = ("start", "right", "left", "up", "down")


def _snake(grid: Tensor) -> Tensor:
    """Boustrophedon over the rows of ``grid`` [h, w]: even rows as given, odd rows reversed."""
    odd = (torch.arange(grid.shape[0], device=grid.device) % 2 == 1)[:, None]
    return torch.where(odd, grid.flip(1), grid).reshape(-1)


def _routes(H: int, W: int, routes: int, device: torch.device) -> Tensor:
    grid = torch.arange(H * W, device=device).view(H, W)
    r0 = _snake(grid)  # rows from top-left
    r2 = _snake(grid.t())  # columns from top-left
    r4 = _snake(grid.flip(1))  # rows from top-right
    r6 = _snake(grid.flip(0).t())  # columns from bottom-left
    all_routes = (r0, r0.flip(0), r2, r2.flip(0), r4, r4.flip(0), r6, r6.flip(0))
    return torch.stack(all_routes[:routes])  # [K, L]


def _build(H: int, W: int, routes: int, *, device: torch.device) -> _index.ScanIndex:
    return _index.make_index(_routes(H, W, routes, device), H * W, index_holes=False, inverse_holes=False)


def _build_ids(H: int, W: int, routes: int, *, device: torch.device) -> Tensor:
    order = _routes(H, W, routes, device)
    dh = torch.diff(torch.div(order, W, rounding_mode="floor"), dim=1)
    dw = torch.diff(order % W, dim=1)
    moves = torch.where(dw == 1, 1, torch.where(dw == -1, 2, torch.where(dh == -1, 3, 4)))
    return torch.cat([torch.zeros_like(order[:, :1]), moves], dim=1)


def _args(op: str, H: int, W: int, routes: int) -> None:
    check_size(op, "H", H)
    check_size(op, "W", W)
    if isinstance(routes, bool) or not isinstance(routes, int) or not 1 <= routes <= MAX_ROUTES:
        raise ValueError(f"{op}: routes must be an int in [1, {MAX_ROUTES}] (PlainMamba uses 4), got {routes!r}")


def zigzag_scan_2d(x: Tensor, H: int, W: int, routes: int = 4) -> Tensor:
    """Read an H x W grid along ``routes`` snake routes (see the module table for their order).

    Args:
        x: tokens [B, L, C] of a row-major grid, L = H*W.
        H, W: grid height and width (any positive sizes).
        routes: number of routes K, 1..8; the first K of the table are used (4 = PlainMamba).

    Returns:
        [B, L, K, C], contiguous; pair it with :func:`zigzag_direction_ids` for the direction-aware B.

    Examples:
        >>> x = torch.randn(2, 5 * 7, 16)
        >>> y = zigzag_scan_2d(x, 5, 7)                 # [2, 35, 4, 16]
        >>> ids = zigzag_direction_ids(5, 7)            # [4, 35], values in 0..4
        >>> out = zigzag_merge_2d(y, 5, 7)              # [2, 35, 16]
    """
    _args("zigzag_scan_2d", H, W, routes)
    x = check_tokens("zigzag_scan_2d", "x", x, H * W, "H*W = {}*{}", H, W)
    return _index.scan(x, _index.cached(_build, H, W, routes, device=x.device))


def zigzag_merge_2d(y: Tensor, H: int, W: int, routes: int = 4) -> Tensor:
    """Un-permute each route of :func:`zigzag_scan_2d` and sum over K (its exact adjoint).

    Args:
        y: [B, L, K, C] in route order, K = ``routes``.
        H, W, routes: as passed to :func:`zigzag_scan_2d`.

    Returns:
        [B, L, C] in row-major grid order.
    """
    _args("zigzag_merge_2d", H, W, routes)
    y = check_scanned("zigzag_merge_2d", "y", y, H * W, routes, "L' = H*W = {}*{}, K = routes", H, W)
    return _index.merge(y, _index.cached(_build, H, W, routes, device=y.device))


def zigzag_direction_ids(H: int, W: int, routes: int = 4, device: torch.device | str | None = None) -> Tensor:
    """Direction of the move that reached each token, in route order.

    Ids (PlainMamba's ``direction_Bs`` rows): 0 start (first token of a route), 1 right, 2 left,
    3 up, 4 down. A model adds ``direction_Bs[ids.T]`` ([L, K, N]) to B scanned as [B, L, K, N].

    Args:
        H, W, routes: as passed to :func:`zigzag_scan_2d`.
        device: where to put the ids (default CPU).

    Returns:
        [K, L] long; the cached tensor is shared between calls, so do not modify it in place.
    """
    _args("zigzag_direction_ids", H, W, routes)
    return _index.cached(_build_ids, H, W, routes, device=torch.device("cpu" if device is None else device))
