"""Backend registry and the ``backend="auto"`` resolution shared by every op.

Backends:
    ``ref``      sequential float32/float64 loop; the oracle.
    ``chunked``  numerically stable parallel PyTorch (any device).
    ``cpu``      fused C kernel compiled on first use (CPU tensors).
    ``triton``   Triton kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

The environment variable ``MZ_SCAN_BACKEND`` replaces what ``"auto"`` would pick, for every op
that implements the named backend (it is ignored by ops that do not).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("ref", "chunked", "cpu", "triton")
ENV_VAR = "MZ_SCAN_BACKEND"

# name -> probe returning None when usable, else a one-line reason
_PROBES: dict[str, Callable[[], str | None]] = {}
_STATUS: dict[str, str | None] = {}


def register_probe(name: str, probe: Callable[[], str | None]) -> None:
    """Register the availability probe of backend ``name`` (called lazily, result cached)."""
    _PROBES[name] = probe
    _STATUS.pop(name, None)


def unavailable_reason(name: str) -> str | None:
    """``None`` if backend ``name`` can run in this process, else why not."""
    if name not in _STATUS:
        probe = _PROBES.get(name)
        try:
            _STATUS[name] = None if probe is None else probe()
        except Exception as e:  # a probe must never crash the caller
            _STATUS[name] = f"{type(e).__name__}: {e}"
    return _STATUS[name]


def backend_status() -> dict[str, str | None]:
    """Every backend with ``None`` (available) or the reason it is unavailable."""
    return {b: unavailable_reason(b) for b in BACKENDS}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(
    op: str,
    requested: str,
    device: torch.device,
    supported: Sequence[str],
    auto: Callable[[], str],
) -> str:
    """Turn ``requested`` (a backend name or ``"auto"``) into a runnable backend for ``op``.

    Args:
        op: public op name (for messages).
        requested: user's ``backend=`` argument.
        device: device of the op's tensors.
        supported: backends the op implements.
        auto: the op's size/device policy, called when ``requested == "auto"`` and no env override.
    """
    if requested not in (*supported, "auto"):
        raise ValueError(f"{op}: backend must be one of {['auto', *supported]}, got {requested!r}")
    name = requested
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env not in (*BACKENDS, "auto"):
            raise ValueError(f"{op}: environment variable {ENV_VAR} must be one of {list(BACKENDS)}, got {env!r}")
        name = env if env in supported else auto()
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"{op}: backend {name!r} is unavailable: {reason}")
    return name
