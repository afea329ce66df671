"""Mamba-2 SSD (state-space duality) scan, as ``mamba_chunk_scan_combined``, and its single step.

Backends: ``ref`` (sequential loop, hand-written backward; the oracle), ``chunked`` (stable
block decomposition, autograd backward) and ``triton`` (chunked Triton kernels; CUDA, or the
interpreter). All run through the ``mz::ssd_scan_fwd`` custom op, so the scan works under
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import torch

from .._backend import resolve, unavailable_reason
from .._validate import STATE_DTYPES, check_bool, check_positive_int, check_same_device, check_tensor
from . import _op  # noqa: F401  (registers mz::ssd_scan_fwd / mz::ssd_scan_bwd)
from .step import check_d, ssd_step

__all__ = ["ssd_scan", "ssd_step", "SSD_BACKENDS"]

SSD_BACKENDS = ("ref", "chunked", "triton")
_OP = "ssd_scan"
# At L = 1 the loop costs about the same as the chunked path (fwd+bwd, measured on a 2-core CPU);
# from L = 2 on, chunked wins (1.5-10x at L = 2-32 for H*P*N from 2K to 98K).
_AUTO_REF_MAX_LEN = 1
_INDEX_DTYPES = (torch.int32, torch.int64)


def _auto(device: torch.device, dtype: torch.dtype, length: int) -> str:
    if device.type == "cuda" and dtype != torch.float64 and unavailable_reason("triton") is None:
        return "triton"
    return "ref" if length <= _AUTO_REF_MAX_LEN else "chunked"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2 SSD scan over a sequence (semantics of mamba_ssm's ``mamba_chunk_scan_combined``).

    With ``delta = softplus(dt + dt_bias)`` (``dt + dt_bias`` when ``dt_softplus=False``), per
    position ``t`` and head ``h`` (reading group ``h // (H // G)`` of ``B``/``C``)::

        state_t = exp(delta_t * A) * state_{t-1} + delta_t * x_t (outer) B_t     # [P, N]
        y_t     = (C_t . state_t + D * x_t) * silu(z_t)

    The state, every exponential and all accumulation are float32 (float64 when ``x`` is
    float64); ``y`` is returned in ``x.dtype``.

    Args:
        x: ``[B, L, H, P]`` inputs (``L >= 1``).
        dt: ``[B, L, H]`` step sizes (before bias/softplus).
        A: ``[H]`` per-head decay rate, normally negative (``-exp(A_log)``).
        B: ``[B, L, G, N]`` input projection; ``H`` must be divisible by ``G``.
        C: ``[B, L, G, N]`` output projection.
        chunk_size: chunk length of the ``chunked`` backend (any ``L`` works, not only multiples);
            ``triton`` rounds it down to a power of two in [16, 64] ([16, 32] for float32).
        D: ``[H, P]`` or ``[H]`` skip connection, optional.
        z: ``[B, L, H, P]`` gate, optional (``y *= silu(z)``).
        dt_bias: ``[H]`` added to ``dt``, optional.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        initial_state: ``[B, H, P, N]`` float32/float64 state before position 0, optional.
        seq_idx: ``[B, L]`` int32/int64 ids of packed sequences; the state restarts from zero
            wherever the id changes between consecutive positions. ``initial_state`` feeds the
            first sequence only, and the final state is that of the last one.
        output_final_state: also return the state after position ``L - 1``.
        backend: ``"auto"`` (``triton`` for CUDA tensors when Triton is available, else
            ``chunked`` except for tiny ``L``), ``"ref"``, ``"chunked"`` or ``"triton"``;
            ``MZ_SCAN_BACKEND`` overrides ``"auto"``.

    Returns:
        ``(y [B, L, H, P], final_state [B, H, P, N] or None)``. Every input except ``seq_idx``,
        and the final state, is differentiable.

    Examples:
        >>> y, state = ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, output_final_state=True)
        >>> y2, _ = ssd_scan(x2, dt2, A, B2, C2, D=D, z=z2, dt_bias=dt_bias, initial_state=state)
    """
    check_tensor(_OP, "x", x, dims="B L H P")
    b, length, h, p = x.shape
    if length < 1:
        raise ValueError(f"{_OP}: x must have sequence length L >= 1, got shape {tuple(x.shape)}")
    check_tensor(_OP, "dt", dt, dims="B L H", shape=(b, length, h))
    check_tensor(_OP, "A", A, dims="H", shape=(h,))
    check_tensor(_OP, "B", B, dims="B L G N", shape=(b, length, None, None))
    g, n = B.shape[2], B.shape[3]
    check_tensor(_OP, "C", C, dims="B L G N", shape=(b, length, g, n))
    if h % g:
        raise ValueError(f"{_OP}: number of heads H must be divisible by number of groups G, got H={h}, G={g}")
    check_positive_int(_OP, "chunk_size", chunk_size)
    check_d(_OP, D, h, p)
    if z is not None:
        check_tensor(_OP, "z", z, dims="B L H P", shape=(b, length, h, p))
    if dt_bias is not None:
        check_tensor(_OP, "dt_bias", dt_bias, dims="H", shape=(h,))
    if initial_state is not None:
        check_tensor(_OP, "initial_state", initial_state, dims="B H P N", shape=(b, h, p, n), dtypes=STATE_DTYPES)
    if seq_idx is not None:
        check_tensor(_OP, "seq_idx", seq_idx, dims="B L", shape=(b, length), dtypes=_INDEX_DTYPES)
    check_bool(_OP, "dt_softplus", dt_softplus)
    check_bool(_OP, "output_final_state", output_final_state)
    device = check_same_device(
        _OP, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state, seq_idx=seq_idx
    )
    name = resolve(_OP, backend, device, SSD_BACKENDS, lambda: _auto(device, x.dtype, length))
    y, final_state = torch.ops.mz.ssd_scan_fwd(
        x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size, bool(dt_softplus), name
    )
    return y, (final_state if output_final_state else None)
