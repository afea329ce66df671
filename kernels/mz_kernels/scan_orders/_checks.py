"""Argument checks shared by the scan orders (one-line ``ValueError`` naming op, argument, expected vs got)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_size(op: str, name: str, value: object, *, minimum: int = 1) -> int:
    """A grid size or window parameter: an int (or a symbolic int under ``torch.compile``) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
    return value  # type: ignore[return-value]


def _as_tensor(op: str, name: str, t: object, dims: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor of shape [{dims}], got {type(t).__name__}")
    n = len(dims.split(", "))
    if t.dim() != n:
        raise ValueError(f"{op}: {name} must have {n} dims [{dims}], got {t.dim()} dims with shape {tuple(t.shape)}")
    return t


def check_tokens(op: str, name: str, x: object, length: int, what: str, *what_args: object) -> Tensor:
    """``x`` must be [B, L, C] with ``L == length``.

    ``what.format(*what_args)`` spells how L is made, e.g. ``("H*W = {}*{}", H, W)``; it is only
    formatted on error, so symbolic sizes under ``torch.compile`` are never turned into strings.
    """
    x = _as_tensor(op, name, x, "B, L, C")
    if x.shape[1] != length:
        raise ValueError(
            f"{op}: {name} must have L = {what.format(*what_args)} = {length} tokens, "
            f"got L = {x.shape[1]} (shape {tuple(x.shape)})"
        )
    return x


def check_scanned(
    op: str, name: str, y: object, length: int, directions: int, what: str, *what_args: object
) -> Tensor:
    """``y`` must be [B, L', K, C] with ``L' == length`` and ``K == directions`` (``what`` as in :func:`check_tokens`)."""
    y = _as_tensor(op, name, y, "B, L', K, C")
    if y.shape[1] != length or y.shape[2] != directions:
        raise ValueError(
            f"{op}: {name} must have shape [B, L', K, C] = [*, {length}, {directions}, *] "
            f"({what.format(*what_args)}), got {tuple(y.shape)}"
        )
    return y


def check_choice(op: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


def check_flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be a bool, got {value!r}")
    return value
