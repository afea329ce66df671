"""Argument checks shared by every public op: one clear ``ValueError`` per mistake.

Each message names the op, the argument, what was expected and what was given, e.g.
``selective_scan: B must have shape [B, L, G, N] = [2, 64, *, 16], got (2, 63, 1, 16)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATE_DTYPES = (torch.float32, torch.float64)


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dims: str,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    contiguous: bool = True,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``len(dims.split())`` and (optionally) the given shape.

    Args:
        op: public op name, used as the message prefix.
        name: argument name.
        dims: symbolic dims, e.g. ``"B L D"``; shown in the message.
        shape: expected sizes, ``None`` where any size is fine.
        dtypes: allowed dtypes.
        contiguous: require ``t.is_contiguous()`` (fast kernels index raw memory).
    """
    sym = dims.split()
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor of shape [{', '.join(sym)}], got {type(t).__name__}")
    if t.dim() != len(sym):
        raise ValueError(
            f"{op}: {name} must have {len(sym)} dims [{', '.join(sym)}], got {t.dim()} dims with shape {tuple(t.shape)}"
        )
    if shape is not None:
        for s, want in zip(t.shape, shape):
            if want is not None and s != want:
                raise ValueError(
                    f"{op}: {name} must have shape [{', '.join(sym)}] = {_fmt(shape)}, got {tuple(t.shape)}"
                )
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (strides {tuple(t.stride())} for shape {tuple(t.shape)}); call .contiguous()"
        )
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All non-None tensors must live on one device; returns it."""
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    first = next(iter(devs.values()))
    for k, d in devs.items():
        if d != first:
            raise ValueError(f"{op}: all tensors must be on one device; {k} is on {d}, expected {first}")
    return first


def check_bool(op: str, name: str, value: object) -> bool:
    """``value`` must be a real ``bool`` (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be True or False, got {value!r}")
    return value


def check_choice(op: str, name: str, value: object, choices: Sequence[object]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


def check_positive_int(op: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value
