"""Depthwise causal conv1d on channel-last ``[B, L, D]`` as ``W`` shifted multiply-adds, and its backward.

``y_t = act(bias + sum_k weight[:, k] * x_{t-(W-1)+k})``, where positions before ``t = 0`` read
``initial_state`` (zeros when absent). The state is the last ``W - 1`` inputs, ``[B, D, W-1]``.
Math and the state are float32 (float64 when ``x`` is float64); ``y`` is returned in ``x.dtype``.
"""
from __future__ import annotations

import torch

from .._oputil import compute_dtype  # noqa: F401  (re-exported for the backends)
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")



def _padded(x: torch.Tensor, width: int, initial_state: torch.Tensor | None) -> torch.Tensor:
    """``[B, W-1+L, D]`` in the compute dtype: the state (or zeros) followed by ``x``."""
    cdt = compute_dtype(x)
    b, _, d = x.shape
    if initial_state is None:
        head = x.new_zeros((b, width - 1, d), dtype=cdt)
    else:
        head = initial_state.to(cdt).transpose(1, 2)
    return torch.cat([head, x.to(cdt)], dim=1)


def _pre_activation(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int) -> torch.Tensor:
    w = weight.to(xp.dtype)
    out = xp[:, :length] * w[:, 0]
    for k in range(1, w.shape[1]):
        out = out + xp[:, k : k + length] * w[:, k]
    return out if bias is None else out + bias.to(xp.dtype)


def conv1d_ref_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv (inputs already validated).

    Args:
        x: ``[B, L, D]``; weight: ``[D, W]``; bias: ``[D]``; initial_state: ``[B, D, W-1]``.

    Returns:
        ``(y [B, L, D] in x.dtype, final_state [B, D, W-1] in the compute dtype)``.
    """
    length, width = x.shape[1], weight.shape[1]
    xp = _padded(x, width, initial_state)
    y = _pre_activation(xp, weight, bias, length)
    if activation == "silu":
        y = F.silu(y)
    final = xp[:, length:].transpose(1, 2).contiguous()
    return y.to(x.dtype), final


def conv1d_ref_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Backward of :func:`conv1d_ref_fwd`: a causal correlation of ``dy`` with the flipped weight.

    Args:
        dy: ``[B, L, D]`` cotangent of ``y``; dfinal: ``[B, D, W-1]`` cotangent of the final state.

    Returns:
        Gradients keyed ``x, weight, bias, initial_state`` (``None`` for absent inputs), each in
        the dtype of its input.
    """
    length, width = x.shape[1], weight.shape[1]
    xp = _padded(x, width, initial_state)
    dpre = dy.to(xp.dtype)
    if activation == "silu":
        pre = _pre_activation(xp, weight, bias, length)
        sig = torch.sigmoid(pre)
        dpre = dpre * sig * (1 + pre * (1 - sig))
    w = weight.to(xp.dtype)
    dxp = torch.zeros_like(xp)
    dxp[:, length:] = dfinal.to(xp.dtype).transpose(1, 2)
    dweight = []
    for k in range(width):
        dxp[:, k : k + length] += dpre * w[:, k]
        dweight.append((dpre * xp[:, k : k + length]).sum((0, 1)))
    return {
        "x": dxp[:, width - 1 :].to(x.dtype),
        "weight": torch.stack(dweight, dim=1).to(weight.dtype),
        "bias": None if bias is None else dpre.sum((0, 1)).to(bias.dtype),
        "initial_state": None
        if initial_state is None
        else dxp[:, : width - 1].transpose(1, 2).to(initial_state.dtype).clone(memory_format=torch.contiguous_format),
    }
