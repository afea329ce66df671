"""Depthwise causal conv1d on channel-last ``[B, L, D]`` (as ``causal_conv1d_fn``) and its single step.

Backends: ``ref`` (shifted multiply-adds in PyTorch), ``cpu`` (a C kernel compiled on first use,
CPU tensors) and ``triton`` (CUDA, or the interpreter).
Runs through the ``mz::causal_conv1d_fwd`` custom op, so it works under
``torch.compile(fullgraph=True)``; the state is float32.
"""
from __future__ import annotations

import torch

from .._backend import resolve, unavailable_reason
from .._validate import STATE_DTYPES, check_choice, check_bool, check_same_device, check_tensor
from . import _op  # registers mz::causal_conv1d_fwd / mz::causal_conv1d_bwd
from .ref import ACTIVATIONS
from .step import causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step", "CONV1D_BACKENDS"]

CONV1D_BACKENDS = _op.BACKENDS
_OP = "causal_conv1d"


def _auto(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda" and dtype != torch.float64 and unavailable_reason("triton") is None:
        return "triton"
    if device.type == "cpu" and dtype != torch.float64 and unavailable_reason("cpu") is None:
        return "cpu"
    return "ref"


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal 1-D convolution along ``L``.

    ``y_t = act(bias + sum_k weight[:, k] * x_{t-(W-1)+k})``; positions before 0 read
    ``initial_state`` (zeros when absent). Math runs in float32 (float64 when ``x`` is float64).

    Args:
        x: ``[B, L, D]`` inputs (``L >= 1``).
        weight: ``[D, W]`` depthwise kernel, ``W >= 1``.
        bias: ``[D]``, optional.
        activation: ``None`` or ``"silu"``.
        initial_state: ``[B, D, W-1]`` float32/float64, the ``W - 1`` inputs before position 0
            (oldest first), optional.
        output_final_state: also return the last ``W - 1`` inputs (what the next call's
            ``initial_state`` or ``causal_conv1d_step`` needs).
        backend: ``"auto"`` (``triton`` for CUDA tensors when Triton is available, ``cpu`` for CPU
            tensors when the C kernel builds, else ``ref``), ``"ref"``, ``"cpu"`` or ``"triton"``;
            ``MZ_SCAN_BACKEND`` overrides ``"auto"``.

    Returns:
        ``(y [B, L, D] in x.dtype, final_state [B, D, W-1] or None)``; differentiable in
        ``x``, ``weight``, ``bias``, ``initial_state`` and through the final state.

    Examples:
        >>> y, state = causal_conv1d(x, weight, bias, activation="silu", output_final_state=True)
        >>> y2, _ = causal_conv1d(x2, weight, bias, activation="silu", initial_state=state)
    """
    check_tensor(_OP, "x", x, dims="B L D")
    b, length, d = x.shape
    if length < 1:
        raise ValueError(f"{_OP}: x must have sequence length L >= 1, got shape {tuple(x.shape)}")
    check_tensor(_OP, "weight", weight, dims="D W", shape=(d, None))
    width = weight.shape[1]
    if width < 1:
        raise ValueError(f"{_OP}: weight must have kernel width W >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(_OP, "bias", bias, dims="D", shape=(d,))
    check_choice(_OP, "activation", activation, ACTIVATIONS)
    if initial_state is not None:
        check_tensor(
            _OP, "initial_state", initial_state, dims="B D W-1", shape=(b, d, width - 1), dtypes=STATE_DTYPES
        )
    check_bool(_OP, "output_final_state", output_final_state)
    device = check_same_device(_OP, x=x, weight=weight, bias=bias, initial_state=initial_state)
    name = resolve(_OP, backend, device, CONV1D_BACKENDS, lambda: _auto(device, x.dtype))
    y, final_state = torch.ops.mz.causal_conv1d_fwd(x, weight, bias, initial_state, activation, name)
    return y, (final_state if output_final_state else None)
