"""Mamba-1 (S6) selective scan, channel-last, with a differentiable final state and an initial state.

Recurrence, per batch b, channel d, state n (channel d reads group ``g = d // (D / G)``)::

    dt_t = softplus(delta_t + delta_bias)              (without softplus if delta_softplus=False)
    h_t  = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[g, n] * u_t
    y_t  = sum_n C_t[g, n] * h_t[n] + D[d] * u_t
    out  = y * silu(z)                                 (if z is given)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._validate import FLOAT_DTYPES, STATE_DTYPES, check_bool, check_same_device, check_tensor
from ._op import selective_scan_fwd
from .step import selective_scan_step

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_step", "SUPPORTED_BACKENDS"]

SUPPORTED_BACKENDS = ("ref", "chunked", "cpu", "triton")
_OP = "selective_scan"


def _auto(device: torch.device, Bsz: int, L: int, Dm: int, N: int) -> str:
    """The measured size/device policy of ``backend="auto"`` (see BENCHMARKS.md)."""
    if device.type == "cuda" and N <= 256 and _backend.unavailable_reason("triton") is None:
        return "triton"  # the Triton kernel keeps the [block of D, N] state in registers: N <= 256
    if device.type == "cpu" and _backend.unavailable_reason("cpu") is None:
        return "cpu"
    return "chunked" if (device.type != "cpu" or (L >= 128 and Bsz * Dm * N <= 1 << 16)) else "ref"


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
    check_tensor(_OP, "u", u, dims="B L D")
    Bsz, L, Dm = u.shape
    if L < 1 or Dm < 1 or Bsz < 1:
        raise ValueError(f"{_OP}: u must have B, L, D >= 1, got shape {tuple(u.shape)}")
    check_tensor(_OP, "delta", delta, dims="B L D", shape=(Bsz, L, Dm), dtypes=(u.dtype,))
    check_tensor(_OP, "A", A, dims="D N", shape=(Dm, None), dtypes=STATE_DTYPES)
    N = A.shape[1]
    check_tensor(_OP, "B", B, dims="B L G N", shape=(Bsz, L, None, N))
    G = B.shape[2]
    if G < 1 or Dm % G != 0:
        raise ValueError(f"{_OP}: D = {Dm} channels must be divisible by the number of groups G = {G} (B.shape[2])")
    check_tensor(_OP, "C", C, dims="B L G N", shape=(Bsz, L, G, N), dtypes=(B.dtype,))
    if D is not None:
        check_tensor(_OP, "D", D, dims="D", shape=(Dm,), dtypes=STATE_DTYPES)
    if z is not None:
        check_tensor(_OP, "z", z, dims="B L D", shape=(Bsz, L, Dm), dtypes=(u.dtype,))
    if delta_bias is not None:
        check_tensor(_OP, "delta_bias", delta_bias, dims="D", shape=(Dm,), dtypes=STATE_DTYPES)
    if initial_state is not None:
        check_tensor(_OP, "initial_state", initial_state, dims="B D N", shape=(Bsz, Dm, N), dtypes=STATE_DTYPES)
    return check_same_device(_OP, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Selective scan (Mamba-1 S6), channel-last.

    Args:
        u: inputs ``[B, L, D]`` (float32, float16, bfloat16 or float64).
        delta: step sizes before ``delta_bias``/softplus, ``[B, L, D]``, same dtype as ``u``.
        A: state matrix ``[D, N]``, float32 (float64 for gradcheck); negative for a stable scan.
        B: input projections ``[B, L, G, N]``; channel d uses group ``d // (D / G)``.
        C: output projections ``[B, L, G, N]``, same dtype as ``B``.
        D: skip ``[D]`` (float32), optional.
        z: gate ``[B, L, D]``: the output is multiplied by ``silu(z)``; optional.
        delta_bias: ``[D]`` added to ``delta`` before the softplus; optional.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        initial_state: ``[B, D, N]`` float32 state before position 0; optional (zeros).
        output_final_state: also return the state after position L-1 (differentiable).
        backend: ``"auto"``, ``"ref"``, ``"chunked"``, ``"cpu"`` or ``"triton"``; ``MZ_SCAN_BACKEND``
            replaces the ``"auto"`` choice.

    Returns:
        ``(y [B, L, D] in u.dtype, final_state [B, D, N] float32 or None)``.

    Examples:
        >>> u = torch.randn(2, 64, 32); dt = torch.randn(2, 64, 32)
        >>> A = -torch.rand(32, 16); Bm = torch.randn(2, 64, 1, 16); Cm = torch.randn(2, 64, 1, 16)
        >>> y, h = selective_scan(u, dt, A, Bm, Cm, output_final_state=True)
        >>> y.shape, h.shape
        (torch.Size([2, 64, 32]), torch.Size([2, 32, 16]))
    """
    device = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_bool(_OP, "delta_softplus", delta_softplus)
    check_bool(_OP, "output_final_state", output_final_state)
    Bsz, L, Dm = u.shape
    name = _backend.resolve(
        _OP, backend, device, SUPPORTED_BACKENDS, lambda: _auto(device, Bsz, L, Dm, A.shape[1])
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    y, final, _ = selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, needs_grad, name
    )
    return y, (final if output_final_state else None)


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Adapter with mamba_ssm's ``selective_scan_fn`` layout and defaults (for ports of Vim/VMamba code).

    Args:
        u, delta, z: ``[B, D, L]``.
        A: ``[D, N]``.
        B, C: ``[B, N, L]`` (one group), ``[B, G, N, L]`` (G groups) or ``[D, N]`` (constant over time).
        D, delta_bias: ``[D]``.
        delta_softplus: default False, as in mamba_ssm.
        return_last_state: also return the final state ``[B, D, N]``.

    Returns:
        ``out [B, D, L]`` (and ``last_state [B, D, N]``).
    """
    op = "selective_scan_fn"
    check_tensor(op, "u", u, dims="B D L", contiguous=False)
    Bsz, Dm, L = u.shape

    def to_bl(x, name):
        if x is None:
            return None
        check_tensor(op, name, x, dims="B D L", shape=(Bsz, Dm, L), dtypes=FLOAT_DTYPES, contiguous=False)
        return x.transpose(1, 2).contiguous()

    def to_blgn(x, name):
        if not isinstance(x, Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() == 2:  # time-invariant, one row per channel: G = D groups of one channel each
            check_tensor(op, name, x, dims="D N", shape=(Dm, None), contiguous=False)
            return x.to(u.dtype)[None, None].expand(Bsz, L, Dm, x.shape[1]).contiguous()
        if x.dim() == 3:
            check_tensor(op, name, x, dims="B N L", shape=(Bsz, None, L), contiguous=False)
            return x.permute(0, 2, 1).unsqueeze(2).contiguous()
        check_tensor(op, name, x, dims="B G N L", shape=(Bsz, None, None, L), contiguous=False)
        return x.permute(0, 3, 1, 2).contiguous()

    y, last = selective_scan(
        to_bl(u, "u"), to_bl(delta, "delta"), A.contiguous(), to_blgn(B, "B"), to_blgn(C, "C"),
        D=D, z=to_bl(z, "z"), delta_bias=delta_bias, delta_softplus=delta_softplus,
        output_final_state=return_last_state, backend=backend,
    )
    out = y.transpose(1, 2)
    return (out, last) if return_last_state else out
