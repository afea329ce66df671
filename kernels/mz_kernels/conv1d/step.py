"""Single-step (streaming) causal conv1d update: one new position per call, functional."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import STATE_DTYPES, check_choice, check_same_device, check_tensor
from .ref import ACTIVATIONS, compute_dtype

_OP = "causal_conv1d_step"


def causal_conv1d_step(
    state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the depthwise causal conv by one position.

    ``y = act(bias + sum_k weight[:, k] * window[:, :, k])`` where ``window = [state, x]``
    (``[B, D, W]``); the new state drops the oldest input. Stepping ``L`` times gives the outputs
    and final state of ``causal_conv1d``. Inputs may be strided views such as ``x[:, t]``.

    Args:
        state: ``[B, D, W-1]`` float32/float64, the last ``W - 1`` inputs (oldest first).
        x: ``[B, D]`` input at this position.
        weight: ``[D, W]`` depthwise kernel.
        bias: ``[D]``, optional.
        activation: ``None`` or ``"silu"``.

    Returns:
        ``(y [B, D] in x.dtype, new_state [B, D, W-1])``; the state is float32 (float64 when
        ``x`` is float64). Differentiable.

    Examples:
        >>> y_t, state = causal_conv1d_step(state, x[:, t], weight, bias, activation="silu")
    """
    check_tensor(_OP, "x", x, dims="B D", contiguous=False)
    b, d = x.shape
    check_tensor(_OP, "weight", weight, dims="D W", shape=(d, None), contiguous=False)
    width = weight.shape[1]
    check_tensor(_OP, "state", state, dims="B D W-1", shape=(b, d, width - 1), dtypes=STATE_DTYPES, contiguous=False)
    if bias is not None:
        check_tensor(_OP, "bias", bias, dims="D", shape=(d,), contiguous=False)
    check_choice(_OP, "activation", activation, ACTIVATIONS)
    check_same_device(_OP, state=state, x=x, weight=weight, bias=bias)

    cdt = compute_dtype(x)
    window = torch.cat([state.to(cdt), x.to(cdt)[..., None]], dim=-1)  # [B, D, W]
    y = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:].contiguous()
