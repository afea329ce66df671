"""Public token movers for arbitrary orders (random shuffles, custom routes).

The fixed orders of this package call the registered ops directly with cached indices; these
wrappers take any index, check it, and build its inverse on every call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import _as_tensor, check_size
from ._index import inverse_of
from ._ops import gather_tokens_op, scatter_tokens_op

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_index(op: str, index: object, length: int, device: torch.device) -> Tensor:
    index = _as_tensor(op, "index", index, "K, L'")
    if index.dtype not in _INT_DTYPES:
        raise ValueError(f"{op}: index must have an integer dtype, got {str(index.dtype).replace('torch.', '')}")
    if index.device != device:
        raise ValueError(f"{op}: index must be on {device} (the device of the tokens), got {index.device}")
    index = index.to(torch.long)
    if not torch.compiler.is_compiling() and index.numel() > 0:  # value checks sync; skipped when compiled
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= length:
            raise ValueError(f"{op}: index values must lie in [-1, L - 1] = [-1, {length - 1}], got [{lo}, {hi}]")
        K = index.shape[0]
        counts = torch.zeros(K, length + 1, dtype=torch.long, device=device)
        counts.scatter_add_(1, torch.where(index < 0, length, index), torch.ones_like(index))
        row, tok = divmod(int(counts[:, :length].argmax()), length)
        if int(counts[row, tok]) > 1:
            raise ValueError(f"{op}: each direction may visit a token at most once; index[{row}] visits token {tok} "
                             f"{int(counts[row, tok])} times")
    return index.contiguous()


def _holes(index: Tensor, inverse: Tensor) -> tuple[bool, bool]:
    if torch.compiler.is_compiling():  # data-dependent: assume holes (one extra masking pass)
        return True, True
    return bool((index < 0).any()), bool((inverse < 0).any())


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Read tokens into K orders: ``out[b, j, k, c] = x[b, index[k, j], c]``, zero where ``index == -1``.

    Args:
        x: tokens [B, L, C].
        index: [K, L'] integer order; each row visits a token at most once; ``-1`` = padded slot.

    Returns:
        [B, L', K, C] (contiguous, so ``.reshape(B, L', K * C)`` is free). Adjoint of
        :func:`scatter_tokens`.

    Examples:
        >>> x = torch.randn(2, 6, 3)
        >>> y = gather_tokens(x, torch.stack([torch.arange(6), torch.arange(6).flip(0)]))  # [2, 6, 2, 3]
    """
    x = _as_tensor("gather_tokens", "x", x, "B, L, C")
    index = _check_index("gather_tokens", index, x.shape[1], x.device)
    inverse = inverse_of(index, x.shape[1])
    return gather_tokens_op(x, index, inverse, *_holes(index, inverse))


def scatter_tokens(y: Tensor, index: Tensor, length: int) -> Tensor:
    """Write K orders back to the grid and sum over K: the adjoint of :func:`gather_tokens`.

    Args:
        y: [B, L', K, C] tokens in scan order.
        index: [K, L'] the order ``y`` was gathered with.
        length: number of grid tokens L.

    Returns:
        [B, L, C]; ``out[b, i, c] = sum over (k, j) with index[k, j] == i of y[b, j, k, c]``.
    """
    length = check_size("scatter_tokens", "length", length)
    y = _as_tensor("scatter_tokens", "y", y, "B, L', K, C")
    index = _check_index("scatter_tokens", index, length, y.device)
    if tuple(index.shape) != (y.shape[2], y.shape[1]):
        raise ValueError(
            f"scatter_tokens: index must have shape [K, L'] = [{y.shape[2]}, {y.shape[1]}] to match y, "
            f"got {tuple(index.shape)}"
        )
    inverse = inverse_of(index, length)
    return scatter_tokens_op(y, index, inverse, *_holes(index, inverse))
