"""Dilated sub-grid scans: AtrousMamba-style atrous scan and EfficientVMamba's skip (ES2D) scan.

Both split an H x W grid into the r*r (s*s) interleaved sub-grids of tokens with the same
``(h mod r, w mod r)``:

- :func:`atrous_scan_2d` reads all sub-grids one after another in one sequence (length L, a pure
  permutation). Non-divisible sizes give **uneven** sub-grids (no padding): sub-grid ``(p, q)``
  holds ``ceil((H-p)/r) * ceil((W-q)/r)`` tokens.
- :func:`skip_scan_2d` makes each sub-grid its own direction k (K = s*s sequences of
  ceil(H/s)*ceil(W/s) tokens each), as EfficientVMamba's ``EfficientScan``; non-divisible sizes
  are **padded** at the bottom/right (padded slots read zero), so every direction has one length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _index
from ._checks import check_scanned, check_size, check_tokens


def _build_atrous(H: int, W: int, rate: int, *, device: torch.device) -> _index.ScanIndex:
    h = torch.arange(H, device=device)[:, None]
    w = torch.arange(W, device=device)[None, :]
    sub_grid = ((h % rate) * rate + (w % rate)).reshape(-1)  # which sub-grid each raster token is in
    order = torch.argsort(sub_grid, stable=True)  # sub-grids in raster order of (p, q), raster inside
    return _index.make_index(order[None], H * W, index_holes=False, inverse_holes=False)


def _build_skip(H: int, W: int, stride: int, *, device: torch.device) -> _index.ScanIndex:
    Hs, Ws = _index.ceil_div(H, stride), _index.ceil_div(W, stride)
    grid = torch.arange(H * W, device=device).view(H, W)
    grid = F.pad(grid, (0, Ws * stride - W, 0, Hs * stride - H), value=-1)
    orders = []
    for q in range(stride):  # stride**2 directions, not tokens
        for p in range(stride):
            sub = grid[p::stride, q::stride]  # [Hs, Ws]
            orders.append((sub if len(orders) % 2 == 0 else sub.t()).reshape(-1))
    padded = Hs * Ws * stride * stride != H * W
    return _index.make_index(torch.stack(orders), H * W, index_holes=padded, inverse_holes=stride > 1)


def atrous_scan_2d(x: Tensor, H: int, W: int, rate: int) -> Tensor:
    """Read the ``rate``-dilated sub-grids of an H x W grid one after another.

    Sub-grid ``(p, q)`` = tokens with ``h % rate == p`` and ``w % rate == q``; sub-grids come in
    raster order of ``(p, q)`` and each is read in raster order, so neighbours in the sequence are
    ``rate`` apart on the grid. Non-divisible sizes give uneven sub-grids (no padding).

    Args:
        x: tokens [B, L, C] of a row-major grid, L = H*W.
        H, W: grid height and width.
        rate: dilation r >= 1 (``rate=1`` is the plain raster order).

    Returns:
        [B, L, C], a permutation of the tokens.

    Examples:
        >>> x = torch.randn(2, 5 * 7, 8)
        >>> torch.equal(atrous_merge_2d(atrous_scan_2d(x, 5, 7, rate=2), 5, 7, rate=2), x)
        True
    """
    op = "atrous_scan_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    check_size(op, "rate", rate)
    x = check_tokens(op, "x", x, H * W, "H*W = {}*{}", H, W)
    return _index.scan(x, _index.cached(_build_atrous, H, W, rate, device=x.device)).squeeze(2)


def atrous_merge_2d(y: Tensor, H: int, W: int, rate: int) -> Tensor:
    """Inverse (and adjoint) of :func:`atrous_scan_2d`.

    Args:
        y: [B, L, C] in atrous order.
        H, W, rate: as passed to :func:`atrous_scan_2d`.

    Returns:
        [B, L, C] in row-major grid order.
    """
    op = "atrous_merge_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    check_size(op, "rate", rate)
    y = check_tokens(op, "y", y, H * W, "H*W = {}*{}", H, W)
    return _index.merge(y.unsqueeze(2), _index.cached(_build_atrous, H, W, rate, device=y.device))


def skip_scan_2d(x: Tensor, H: int, W: int, stride: int = 2) -> Tensor:
    """EfficientVMamba skip-sampled scan: each of the stride*stride sub-grids is one direction.

    Direction ``k = q * stride + p`` reads sub-grid ``(p, q)`` (tokens with ``h % stride == p``,
    ``w % stride == q``) in row-major order for even k and column-major order for odd k; for
    ``stride=2`` that is EfficientVMamba's ``EfficientScan`` (0: (0,0) rows, 1: (1,0) columns,
    2: (0,1) rows, 3: (1,1) columns). Sizes not divisible by ``stride`` are padded with zeros.

    Args:
        x: tokens [B, L, C] of a row-major grid, L = H*W.
        H, W: grid height and width.
        stride: sampling step s >= 1.

    Returns:
        [B, L', K, C] with K = s*s and L' = ceil(H/s) * ceil(W/s).

    Examples:
        >>> y = skip_scan_2d(torch.randn(2, 5 * 7, 8), 5, 7)   # [2, 3 * 4, 4, 8]
        >>> skip_merge_2d(y, 5, 7).shape                       # every token back from its direction
        torch.Size([2, 35, 8])
    """
    op = "skip_scan_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    check_size(op, "stride", stride)
    x = check_tokens(op, "x", x, H * W, "H*W = {}*{}", H, W)
    return _index.scan(x, _index.cached(_build_skip, H, W, stride, device=x.device))


def skip_merge_2d(y: Tensor, H: int, W: int, stride: int = 2) -> Tensor:
    """Scatter each direction of :func:`skip_scan_2d` back to its sub-grid (inverse and adjoint).

    Args:
        y: [B, L', K, C], K = stride**2, L' = ceil(H/stride) * ceil(W/stride).
        H, W, stride: as passed to :func:`skip_scan_2d`.

    Returns:
        [B, L, C] in row-major grid order (padding dropped).
    """
    op = "skip_merge_2d"
    check_size(op, "H", H)
    check_size(op, "W", W)
    check_size(op, "stride", stride)
    Lp = _index.ceil_div(H, stride) * _index.ceil_div(W, stride)
    y = check_scanned(op, "y", y, Lp, stride * stride, "L' = ceil(H/s)*ceil(W/s), K = s*s for s={}", stride)
    return _index.merge(y, _index.cached(_build_skip, H, W, stride, device=y.device))
