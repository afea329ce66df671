"""Cached scan orders: an order is built once per (builder, sizes, params, device) and reused.

Builders are written with tensor ops only (no Python loop over tokens), so under ``torch.compile``
the same code is traced into the graph (the cache is bypassed there: Dynamo would otherwise trace
through ``lru_cache`` anyway, with a warning), while eager calls hit the cache.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._ops import gather_tokens_op, scatter_tokens_op


class ScanIndex(NamedTuple):
    """One scan order with K directions over a grid of L tokens.

    Attributes:
        index: [K, L'] long; ``index[k, j]`` = grid token at scan position ``j`` of direction ``k``,
            ``-1`` for a padded slot (reads zero).
        inverse: [K, L] long; ``inverse[k, i]`` = scan position of token ``i`` in direction ``k``,
            ``-1`` when direction ``k`` skips token ``i``.
        index_holes: whether ``index`` contains ``-1``.
        inverse_holes: whether ``inverse`` contains ``-1``.
    """

    index: Tensor
    inverse: Tensor
    index_holes: bool
    inverse_holes: bool


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def inverse_of(index: Tensor, length: int) -> Tensor:
    """[K, L'] order with ``-1`` holes -> [K, length] inverse with ``-1`` for tokens not visited."""
    K, Lp = index.shape
    inv = torch.full((K, length + 1), -1, dtype=torch.long, device=index.device)
    pos = torch.arange(Lp, dtype=torch.long, device=index.device).expand(K, Lp)
    inv.scatter_(1, torch.where(index < 0, length, index), pos)  # holes land in the spare column
    return inv[:, :length].contiguous()


def make_index(index: Tensor, length: int, *, index_holes: bool, inverse_holes: bool) -> ScanIndex:
    """Wrap an order [K, L'] (each token at most once per direction) with its inverse."""
    index = index.to(torch.long).contiguous()
    return ScanIndex(index, inverse_of(index, length), index_holes, inverse_holes)


def cached(builder: Callable[..., Any], *params: Any, device: torch.device) -> Any:
    """``builder(*params, device=device)``, memoised in eager mode, traced under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return builder(*params, device=device)
    return _cached(builder, params, torch.device(device))


@functools.lru_cache(maxsize=256)
def _cached(builder: Callable[..., Any], params: tuple, device: torch.device) -> Any:
    # normal (not inference) tensors even when first called under torch.inference_mode(): the
    # movers save the index for backward, which inference tensors do not allow
    with torch.inference_mode(False), torch.no_grad():
        return builder(*params, device=device)


def scan(x: Tensor, order: ScanIndex) -> Tensor:
    """x [B, L, C] -> [B, L', K, C]."""
    return gather_tokens_op(x, order.index, order.inverse, order.index_holes, order.inverse_holes)


def merge(y: Tensor, order: ScanIndex) -> Tensor:
    """y [B, L', K, C] -> [B, L, C]: un-permute each direction and sum over K."""
    return scatter_tokens_op(y, order.index, order.inverse, order.index_holes, order.inverse_holes)
