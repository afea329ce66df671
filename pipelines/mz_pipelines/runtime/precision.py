"""Mixed precision: autocast on CUDA only, float32 on CPU, and float32 islands for SSM code.

**Keeping the SSM in float32.** Autocast never changes parameter dtypes (they stay float32, and the
optimiser updates float32 weights); it only runs selected ops (matmul, conv) in bf16/fp16. The
selective scan's recurrence and exponentials must not run that way: decorate the mixer's
``forward`` with :func:`float32_forward`, which switches autocast off and upcasts floating tensor
arguments to float32 for the call. (The ``mz_kernels`` scans also compute their state in float32
whatever the input dtype; the decorator additionally keeps the projections around it in float32.)

Examples:
    >>> class Mixer(nn.Module):
    ...     @float32_forward
    ...     def forward(self, x):  # x: [B, L, D], float32 here even under bf16 autocast
    ...         return self.scan(x)
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
_AMP_DEVICE_TYPES = ("cuda", "cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` on ``device``; ``None`` means float32 throughout.

    ``'auto'``: bf16 on CUDA when supported, else fp16; float32 on CPU.

    Raises:
        UserError: ``'bf16'``/``'fp16'`` requested on a non-CUDA device, or bf16 on a GPU without it.
    """
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"resolve_amp: amp must be one of ['auto', 'off', 'bf16', 'fp16'], got {amp!r}")
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise UserError(f"train.amp={amp!r} needs a CUDA device; on {device.type} use 'auto' or 'off' (float32)")
        return None
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if amp == "bf16":
        raise UserError("train.amp='bf16' but this GPU does not support bfloat16; use 'fp16' or 'auto'")
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and float32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def _to_float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return x.float()
    return x


def float32_forward(fn: F) -> F:
    """Decorator: run ``fn`` with autocast disabled and floating tensor arguments cast to float32.

    Outputs are float32; ops after the call go back under autocast.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for dev in _AMP_DEVICE_TYPES:
                if torch.is_autocast_enabled(dev):
                    stack.enter_context(torch.autocast(device_type=dev, enabled=False))
            args = tuple(_to_float32(a) for a in args)
            kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
