"""VMamba cross scan: K flattenings of an H x W grid run side by side, merged back by summation."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import _index
from ._checks import check_choice, check_scanned, check_size, check_tokens

CrossMode = Literal["cross4", "bi", "uni"]
CROSS_MODES: tuple[str, ...] = ("cross4", "bi", "uni")
CROSS_DIRECTIONS = {"cross4": 4, "bi": 2, "uni": 1}


def _build(H: int, W: int, mode: str, *, device: torch.device) -> _index.ScanIndex:
    grid = torch.arange(H * W, device=device).view(H, W)
    rows, cols = grid.reshape(-1), grid.t().reshape(-1)
    orders = {
        "cross4": (rows, cols, rows.flip(0), cols.flip(0)),
        "bi": (rows, rows.flip(0)),
        "uni": (rows,),
    }[mode]
    return _index.make_index(torch.stack(orders), H * W, index_holes=False, inverse_holes=False)


def _args(op: str, H: int, W: int, mode: str) -> None:
    check_size(op, "H", H)
    check_size(op, "W", W)
    check_choice(op, "mode", mode, CROSS_MODES)


def cross_scan_2d(x: Tensor, H: int, W: int, mode: CrossMode = "cross4") -> Tensor:
    """Flatten an H x W grid in K directions at once (VMamba SS2D).

    Directions, in this order along K:

    - ``"cross4"`` (K=4): 0 row-major (``h*W + w``), 1 column-major (``w*H + h``),
      2 reversed row-major, 3 reversed column-major;
    - ``"bi"`` (K=2): 0 row-major, 1 reversed row-major;
    - ``"uni"`` (K=1): row-major.

    Args:
        x: tokens [B, L, C] of a row-major grid, L = H*W.
        H, W: grid height and width (any positive sizes).
        mode: ``"cross4"``, ``"bi"`` or ``"uni"``.

    Returns:
        [B, L, K, C], contiguous: ``.reshape(B, L, K * C)`` is free and puts channel ``k*C + c`` in
        scan group ``k``.

    Examples:
        >>> y = cross_scan_2d(torch.randn(2, 3 * 5, 8), 3, 5)        # [2, 15, 4, 8]
        >>> cross_merge_2d(y, 3, 5).shape                             # sum of the 4 directions
        torch.Size([2, 15, 8])
    """
    _args("cross_scan_2d", H, W, mode)
    x = check_tokens("cross_scan_2d", "x", x, H * W, "H*W = {}*{}", H, W)
    return _index.scan(x, _index.cached(_build, H, W, mode, device=x.device))


def cross_merge_2d(y: Tensor, H: int, W: int, mode: CrossMode = "cross4") -> Tensor:
    """Un-permute each direction of :func:`cross_scan_2d` and sum over K (its exact adjoint).

    Args:
        y: [B, L, K, C] in scan order, K as given by ``mode``.
        H, W, mode: as passed to :func:`cross_scan_2d`.

    Returns:
        [B, L, C] in row-major grid order.
    """
    _args("cross_merge_2d", H, W, mode)
    K = CROSS_DIRECTIONS[mode]
    y = check_scanned("cross_merge_2d", "y", y, H * W, K, "L' = H*W = {}*{}, K = {} for mode={!r}", H, W, K, mode)
    return _index.merge(y, _index.cached(_build, H, W, mode, device=y.device))
