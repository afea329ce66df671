"""Single-step (streaming) SSD update: one new position per call, functional (no in-place)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import STATE_DTYPES, check_bool, check_same_device, check_tensor
from .ref import compute_dtype, d_as_matrix, discretize_dt, ssd_update

_OP = "ssd_step"


def check_d(op: str, D: object, heads: int, headdim: int, contiguous: bool = True) -> None:
    """``D`` must be ``None``, ``[H]`` or ``[H, P]``."""
    if D is None:
        return
    if isinstance(D, torch.Tensor) and D.dim() == 1:
        check_tensor(op, "D", D, dims="H", shape=(heads,), contiguous=contiguous)
    elif isinstance(D, torch.Tensor) and D.dim() == 2:
        check_tensor(op, "D", D, dims="H P", shape=(heads, headdim), contiguous=contiguous)
    else:
        got = f"shape {tuple(D.shape)}" if isinstance(D, torch.Tensor) else type(D).__name__
        raise ValueError(f"{op}: D must have shape [H, P] = [{heads}, {headdim}] or [H] = [{heads}], got {got}")


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the Mamba-2 SSD recurrence by one position.

    Computes ``new_state = exp(delta * A) * state + delta * x (outer) B`` and
    ``y = (C . new_state + D * x) * silu(z)`` with ``delta = softplus(dt + dt_bias)`` (or
    ``dt + dt_bias`` when ``dt_softplus=False``); head ``h`` reads group ``h // (H // G)``.
    Stepping ``L`` times gives the outputs and final state of ``ssd_scan``. Inputs may be
    strided views such as ``x[:, t]``.

    Args:
        state: ``[B, H, P, N]`` float32/float64 state (e.g. ``ssd_scan(..., output_final_state=True)[1]``).
        x: ``[B, H, P]`` input at this position.
        dt: ``[B, H]`` step sizes.
        A: ``[H]`` per-head decay rate (normally negative).
        B, C: ``[B, G, N]`` input / output projections, ``H % G == 0``.
        D: ``[H, P]`` or ``[H]`` skip connection, optional.
        z: ``[B, H, P]`` gate, optional (``y *= silu(z)``).
        dt_bias: ``[H]`` added to ``dt`` before the softplus, optional.
        dt_softplus: apply softplus to ``dt + dt_bias``.

    Returns:
        ``(y [B, H, P] in x.dtype, new_state [B, H, P, N])``; the state is float32 (float64 when
        ``x`` is float64). Differentiable.

    Examples:
        >>> y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D)
    """
    check_tensor(_OP, "x", x, dims="B H P", contiguous=False)
    b, h, p = x.shape
    check_tensor(_OP, "dt", dt, dims="B H", shape=(b, h), contiguous=False)
    check_tensor(_OP, "A", A, dims="H", shape=(h,), contiguous=False)
    check_tensor(_OP, "B", B, dims="B G N", shape=(b, None, None), contiguous=False)
    g, n = B.shape[1], B.shape[2]
    check_tensor(_OP, "C", C, dims="B G N", shape=(b, g, n), contiguous=False)
    if h % g:
        raise ValueError(f"{_OP}: number of heads H must be divisible by number of groups G, got H={h}, G={g}")
    check_tensor(_OP, "state", state, dims="B H P N", shape=(b, h, p, n), dtypes=STATE_DTYPES, contiguous=False)
    check_d(_OP, D, h, p, contiguous=False)
    if z is not None:
        check_tensor(_OP, "z", z, dims="B H P", shape=(b, h, p), contiguous=False)
    if dt_bias is not None:
        check_tensor(_OP, "dt_bias", dt_bias, dims="H", shape=(h,), contiguous=False)
    check_bool(_OP, "dt_softplus", dt_softplus)
    check_same_device(_OP, state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)

    cdt = compute_dtype(x)
    xf = x.to(cdt)
    _, delta = discretize_dt(dt, dt_bias, dt_softplus, cdt)
    new_state, y = ssd_update(state.to(cdt), xf, delta, A.to(cdt), B.to(cdt), C.to(cdt))
    if D is not None:
        y = y + xf * d_as_matrix(D, p, cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), new_state
