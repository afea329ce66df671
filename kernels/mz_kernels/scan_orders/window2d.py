"""LocalMamba local (windowed) scans: the grid is cut into w x w windows, read window by window.

The grid is padded at the bottom/right up to multiples of the window (padded slots read zero), so
a scan of an H x W grid has L' = ceil(H/w)*w * ceil(W/w)*w tokens; the merge drops the padding.
Orders (LocalMamba ``local_scan``):

- default: windows in raster order, tokens in raster order inside each window;
- ``column_first``: both levels column-major (windows column by column, tokens column by column);
- ``flip``: the whole padded sequence reversed (padded slots then come first).

:func:`local_scan_2d` runs several such directions in one call (LocalMamba's searched set per
layer), padded at the end to a common length so they fold into the groups of one selective scan.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _index
from ._checks import check_flag, check_scanned, check_size, check_tokens

LocalDirection = tuple[int | None, bool, bool]
"""``(window, column_first, flip)``; ``window=None`` is a global (unwindowed) row/column-major scan."""


def _window_order(H: int, W: int, window: int | None, column_first: bool, flip: bool, device: torch.device) -> Tensor:
    grid = torch.arange(H * W, device=device).view(H, W)
    if window is None:
        order = (grid.t() if column_first else grid).reshape(-1)
    else:
        Hg, Wg = _index.ceil_div(H, window), _index.ceil_div(W, window)
        grid = F.pad(grid, (0, Wg * window - W, 0, Hg * window - H), value=-1)
        blocks = grid.view(Hg, window, Wg, window)  # [Hg, row in window, Wg, column in window]
        order = blocks.permute(2, 0, 3, 1) if column_first else blocks.permute(0, 2, 1, 3)
        order = order.reshape(-1)
    return order.flip(0) if flip else order


def _scan_length(H: int, W: int, window: int | None) -> int:
    if window is None:
        return H * W
    return _index.ceil_div(H, window) * window * _index.ceil_div(W, window) * window


def _build(H: int, W: int, directions: tuple[LocalDirection, ...], *, device: torch.device) -> _index.ScanIndex:
    Lp = max(_scan_length(H, W, d[0]) for d in directions)
    orders = []
    for window, column_first, flip in directions:  # a handful of directions, not tokens
        order = _window_order(H, W, window, column_first, flip, device)
        orders.append(F.pad(order, (0, Lp - order.shape[0]), value=-1))
    holes = any(_scan_length(H, W, d[0]) != H * W for d in directions)  # own padding or end filler
    return _index.make_index(torch.stack(orders), H * W, index_holes=holes, inverse_holes=False)


def _check_direction(
    op: str, prefix: str, window: object, column_first: object, flip: object, *, allow_global: bool
) -> None:
    """Check one direction; ``prefix`` names it in messages (``""`` or ``"directions[2] "``)."""
    if allow_global:
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, (int, torch.SymInt)) or window < 1
        ):
            raise ValueError(f"{op}: {prefix}window must be an int >= 1 or None (global scan), got {window!r}")
    else:
        check_size(op, "window", window)
    check_flag(op, f"{prefix}column_first", column_first)
    check_flag(op, f"{prefix}flip", flip)


def window_scan_2d(x: Tensor, H: int, W: int, window: int, column_first: bool = False, flip: bool = False) -> Tensor:
    """Read an H x W grid window by window (LocalMamba local scan).

    Args:
        x: tokens [B, L, C] of a row-major grid, L = H*W.
        H, W: grid height and width (any positive sizes; padded up to multiples of ``window``).
        window: window side w >= 1.
        column_first: windows and the tokens inside them column-major instead of raster.
        flip: reverse the whole (padded) sequence.

    Returns:
        [B, L', C] with L' = ceil(H/w)*w * ceil(W/w)*w; padded slots are zero.

    Examples:
        >>> y = window_scan_2d(torch.randn(2, 5 * 7, 8), 5, 7, window=2)   # [2, 6 * 8, 8]
        >>> window_merge_2d(y, 5, 7, window=2).shape
        torch.Size([2, 35, 8])
    """
    op = "window_scan_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    _check_direction(op, "", window, column_first, flip, allow_global=False)
    x = check_tokens(op, "x", x, H * W, "H*W = {}*{}", H, W)
    order = _index.cached(_build, H, W, ((window, column_first, flip),), device=x.device)
    return _index.scan(x, order).squeeze(2)


def window_merge_2d(y: Tensor, H: int, W: int, window: int, column_first: bool = False, flip: bool = False) -> Tensor:
    """Inverse (and adjoint) of :func:`window_scan_2d`: back to the grid, padding dropped.

    Args:
        y: [B, L', C] in window order, L' = ceil(H/w)*w * ceil(W/w)*w.
        H, W, window, column_first, flip: as passed to :func:`window_scan_2d`.

    Returns:
        [B, L, C] in row-major grid order.
    """
    op = "window_merge_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    _check_direction(op, "", window, column_first, flip, allow_global=False)
    Lp = _scan_length(H, W, window)
    y = check_tokens(op, "y", y, Lp, "ceil(H/w)*w * ceil(W/w)*w for H={}, W={}, w={}", H, W, window)
    order = _index.cached(_build, H, W, ((window, column_first, flip),), device=y.device)
    return _index.merge(y.unsqueeze(2), order)


def _directions(op: str, directions: object) -> tuple[LocalDirection, ...]:
    if isinstance(directions, (str, bytes)) or not isinstance(directions, Sequence) or len(directions) == 0:
        raise ValueError(f"{op}: directions must be a non-empty sequence of (window, column_first, flip), "
                         f"got {directions!r}")
    out = []
    for i, d in enumerate(directions):
        if not isinstance(d, Sequence) or len(d) != 3:
            raise ValueError(f"{op}: directions[{i}] must be a (window, column_first, flip) triple, got {d!r}")
        _check_direction(op, f"directions[{i}] ", *d, allow_global=True)
        out.append((d[0], d[1], d[2]))
    return tuple(out)


def local_scan_length(H: int, W: int, directions: Sequence[LocalDirection]) -> int:
    """L' of :func:`local_scan_2d`: the longest padded length among ``directions``."""
    check_size("local_scan_length", "H", H)
    check_size("local_scan_length", "W", W)
    return max(_scan_length(H, W, d[0]) for d in _directions("local_scan_length", directions))


def local_scan_2d(x: Tensor, H: int, W: int, directions: Sequence[LocalDirection]) -> Tensor:
    """Several local/global scans of one grid in one call (LocalMamba's per-layer direction set).

    Args:
        x: tokens [B, L, C] of a row-major grid, L = H*W.
        H, W: grid height and width.
        directions: K triples ``(window, column_first, flip)`` with the meaning of
            :func:`window_scan_2d`; ``window=None`` is a global row-major (column-major with
            ``column_first``) scan.

    Returns:
        [B, L', K, C] with L' = :func:`local_scan_length`: each direction holds its own window
        order, then zero slots up to the common length L'.

    Examples:
        >>> dirs = [(None, False, False), (None, True, True), (2, False, False), (7, False, True)]
        >>> y = local_scan_2d(torch.randn(2, 14 * 14, 8), 14, 14, dirs)     # [2, 196, 4, 8]
    """
    op = "local_scan_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    dirs = _directions(op, directions)
    x = check_tokens(op, "x", x, H * W, "H*W = {}*{}", H, W)
    return _index.scan(x, _index.cached(_build, H, W, dirs, device=x.device))


def local_merge_2d(y: Tensor, H: int, W: int, directions: Sequence[LocalDirection]) -> Tensor:
    """Un-permute each direction of :func:`local_scan_2d`, drop padding, sum over K (its adjoint).

    Args:
        y: [B, L', K, C] as returned by :func:`local_scan_2d`.
        H, W, directions: as passed to :func:`local_scan_2d`.

    Returns:
        [B, L, C] in row-major grid order.
    """
    op = "local_merge_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    dirs = _directions(op, directions)
    Lp = max(_scan_length(H, W, d[0]) for d in dirs)
    y = check_scanned(op, "y", y, Lp, len(dirs), "L' = local_scan_length, K = len(directions)")
    return _index.merge(y, _index.cached(_build, H, W, dirs, device=y.device))
