"""Triton backend of the depthwise causal conv1d (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

Imported only when the ``triton`` backend runs. Same contract as ``ref.py``: ``conv1d_triton_fwd``
returns ``(y, final_state)``, ``conv1d_triton_bwd`` the gradient dict of ``conv1d_ref_bwd``.

Index convention: ``xp`` is the input extended on the left by the state, ``xp[q]`` for
``q in [0, W-1+L)`` (``q < W-1``: ``initial_state[:, :, q]`` or 0; else ``x[:, q-(W-1)]``), so
``y_t = act(bias + sum_k w_k xp[t+k])`` and ``final_state[s] = xp[L+s]``.

* Forward, grid ``(cdiv(L, BL), B, cdiv(D, BD))``: one ``[BL, BD]`` channel-last tile per program
  (``D`` contiguous: coalesced rows), ``W`` shifted loads, bias and SiLU fused; the program holding
  the last positions also writes the final state.
* Backward: with SiLU, the forward kernel in ``DPRE`` mode recomputes the pre-activation and writes
  ``dpre = dy * silu'(pre)`` (float32 ``[B, L, D]``); without it ``dpre = dy``. Then
  ``conv1d_bwd_kernel`` forms ``dxp[q] = sum_k w_k dpre[q-k] + dfinal[q-L]``, i.e. ``dx`` and
  (first tile) ``dinitial_state``; each program walks up to 16 tiles (256 positions) and writes
  partial ``dweight [W, BD]`` / ``dbias [BD]`` sums, which torch adds up in a fixed order
  (deterministic, no atomics).
* Sizes: ``BL = 16``, ``BD = min(128, next_pow2(D))``, 4 warps: no register spills in ptxas's
  sm_90 report at ``W = 4`` (larger tiles spill); not timed on hardware. float64 inputs are
  delegated to ``ref``.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._triton_math import sigmoid as _sigmoid, store as _store
from .ref import conv1d_ref_bwd, conv1d_ref_fwd

__all__ = ["conv1d_triton_fwd", "conv1d_triton_bwd"]

_BLOCK_L = 16
_TILES_PER_SPAN = 16  # backward: a program walks 16 tiles (256 positions) before writing its partials
_MAX_BLOCK_D = 128


@triton.jit
def _xp(x_ptr, st_ptr, b, q, d, md, L, D, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """``[R, BD]`` float32 values ``xp[q]`` of batch row ``b`` (``q [R]`` extended indices)."""
    pos = q - (W - 1)
    in_x = (pos >= 0) & (pos < L)
    v = tl.load(x_ptr + (b * L + pos)[:, None] * D + d[None, :], mask=in_x[:, None] & md[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_STATE:
        in_s = (q >= 0) & (q < W - 1)
        s = tl.load(st_ptr + (b * D + d[None, :]) * (W - 1) + q[:, None], mask=in_s[:, None] & md[None, :], other=0.0)
        v = tl.where(in_x[:, None], v, s.to(tl.float32))
    return v


@triton.jit
def conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, st_ptr, y_ptr, final_ptr, dy_ptr, dpre_ptr,
    L, D,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    DPRE: tl.constexpr, EMU: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr,
):
    """Grid ``(cdiv(L, BL), B, cdiv(D, BD))``: ``y`` (and the final state), or with ``DPRE``
    ``dpre = dy * silu'(pre)``."""
    pid_l = tl.program_id(0)  # positions on axis 0: its grid limit is 2**31 - 1, not 65535
    b = tl.program_id(1).to(tl.int64)
    t = pid_l * BL + tl.arange(0, BL)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    md = d < D
    m2 = (t < L)[:, None] & md[None, :]
    acc = tl.zeros([BL, BD], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + d * W + k, mask=md, other=0.0).to(tl.float32)
        acc += _xp(x_ptr, st_ptr, b, t + k, d, md, L, D, W, HAS_STATE) * wk[None, :]
    tok = (b * L + t)[:, None] * D + d[None, :]
    if DPRE:
        gy = tl.load(dy_ptr + tok, mask=m2, other=0.0).to(tl.float32)
        sig = _sigmoid(acc)
        tl.store(dpre_ptr + tok, gy * sig * (1.0 + acc * (1.0 - sig)), mask=m2)
    else:
        if SILU:
            acc = acc * _sigmoid(acc)
        _store(y_ptr + tok, acc, m2, EMU)
        if W > 1:
            if pid_l == tl.num_programs(0) - 1:
                s = tl.arange(0, BW)
                fin = _xp(x_ptr, st_ptr, b, L + s, d, md, L, D, W, HAS_STATE)
                tl.store(final_ptr + (b * D + d[None, :]) * (W - 1) + s[:, None], fin,
                         mask=(s < W - 1)[:, None] & md[None, :])


@triton.jit
def _dxp(dpre_ptr, w_ptr, dfinal_ptr, b, q, d, md, L, D,
         W: tl.constexpr, R: tl.constexpr, BD: tl.constexpr):
    """``[R, BD]`` gradient of ``xp[q]``: ``sum_k w_k dpre[q-k] + dfinal[q-L]``."""
    acc = tl.zeros([R, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        src = q - k
        m = ((src >= 0) & (src < L))[:, None] & md[None, :]
        wk = tl.load(w_ptr + d * W + k, mask=md, other=0.0).to(tl.float32)
        acc += tl.load(dpre_ptr + (b * L + src)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32) \
            * wk[None, :]
    if W > 1:
        fin = q - L
        mf = ((fin >= 0) & (fin < W - 1))[:, None] & md[None, :]
        acc += tl.load(dfinal_ptr + (b * D + d[None, :]) * (W - 1) + fin[:, None], mask=mf, other=0.0)
    return acc


@triton.jit
def conv1d_bwd_kernel(
    dpre_ptr, x_ptr, w_ptr, st_ptr, dfinal_ptr, dx_ptr, dw_ptr, db_ptr, dst_ptr,
    L, D,
    W: tl.constexpr, HAS_STATE: tl.constexpr, EMU: tl.constexpr, TILES: tl.constexpr,
    BL: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr,
):
    """Grid ``(cdiv(L, TILES * BL), B, cdiv(D, BD))``: ``dx`` for ``TILES`` consecutive ``[BL, BD]``
    tiles, their partial ``dweight [B * n_span, W, D]`` and ``dbias [B * n_span, D]`` sums (float32),
    and on the first span ``dinitial_state``."""
    pid_l = tl.program_id(0)  # positions on axis 0: its grid limit is 2**31 - 1, not 65535
    b = tl.program_id(1).to(tl.int64)
    part = b * tl.num_programs(0) + pid_l
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    md = d < D
    kk = tl.arange(0, BK)
    dw = tl.zeros([BK, BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    for j in range(TILES):
        t = (pid_l * TILES + j) * BL + tl.arange(0, BL)
        m2 = (t < L)[:, None] & md[None, :]
        tok = (b * L + t)[:, None] * D + d[None, :]
        dx = _dxp(dpre_ptr, w_ptr, dfinal_ptr, b, t + (W - 1), d, md, L, D, W, BL, BD)
        _store(dx_ptr + tok, dx, m2, EMU)
        gp = tl.load(dpre_ptr + tok, mask=m2, other=0.0).to(tl.float32)
        db += tl.sum(gp, axis=0)
        for k in tl.static_range(W):
            xk = _xp(x_ptr, st_ptr, b, t + k, d, md, L, D, W, HAS_STATE)
            dw += tl.where(kk[:, None] == k, tl.sum(gp * xk, axis=0)[None, :], 0.0)
    tl.store(db_ptr + part * D + d, db, mask=md)
    tl.store(dw_ptr + (part * W + kk[:, None]) * D + d[None, :], dw, mask=(kk < W)[:, None] & md[None, :])
    if HAS_STATE:
        if W > 1:
            if pid_l == 0:
                s = tl.arange(0, BW)
                ds = _dxp(dpre_ptr, w_ptr, dfinal_ptr, b, s, d, md, L, D, W, BW, BD)
                tl.store(dst_ptr + (b * D + d[None, :]) * (W - 1) + s[:, None], ds,
                         mask=(s < W - 1)[:, None] & md[None, :])


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _blocks(d: int, width: int) -> tuple[int, int, int]:
    return _BLOCK_L, min(_MAX_BLOCK_D, triton.next_power_of_2(d)), triton.next_power_of_2(max(1, width - 1))


def conv1d_triton_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv (inputs validated by ``causal_conv1d``); same contract as ``conv1d_ref_fwd``.

    Returns:
        ``(y [B, L, D] in x.dtype, final_state [B, D, W-1] float32)``.
    """
    if x.dtype == torch.float64:
        return conv1d_ref_fwd(x, weight, bias, activation, initial_state)
    with _on_device(x):
        return _forward(x, weight, bias, activation, initial_state)


def _forward(x, weight, bias, activation, initial_state):
    b, length, d = x.shape
    width = weight.shape[1]
    bl, bd, bw = _blocks(d, width)
    y = torch.empty_like(x)
    final = torch.empty(b, d, width - 1, dtype=torch.float32, device=x.device)
    conv1d_fwd_kernel[(triton.cdiv(length, bl), b, triton.cdiv(d, bd))](
        x, weight, x if bias is None else bias, x if initial_state is None else initial_state, y, final, x, x,
        length, d, W=width, HAS_BIAS=bias is not None, HAS_STATE=initial_state is not None,
        SILU=activation == "silu", DPRE=False, EMU=triton_interpreted(), BL=bl, BD=bd, BW=bw, num_warps=4,
    )
    return y, final


def conv1d_triton_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Backward of :func:`conv1d_triton_fwd`.

    Args:
        dy: ``[B, L, D]`` cotangent of ``y``; dfinal: ``[B, D, W-1]`` cotangent of the final state.

    Returns:
        Gradients keyed ``x, weight, bias, initial_state`` (``None`` for absent inputs), each in
        the dtype of its input.
    """
    if x.dtype == torch.float64:
        return conv1d_ref_bwd(dy, dfinal, x, weight, bias, activation, initial_state)
    with _on_device(x):  # cotangents may be expanded views (e.g. of y.sum()): the kernels need them dense
        return _backward(dy.contiguous(), dfinal.contiguous(), x, weight, bias, activation, initial_state)


def _backward(dy, dfinal, x, weight, bias, activation, initial_state):
    b, length, d = x.shape
    width = weight.shape[1]
    bl, bd, bw = _blocks(d, width)
    grid = (triton.cdiv(length, bl), b, triton.cdiv(d, bd))
    state = x if initial_state is None else initial_state
    emu = triton_interpreted()
    dpre = dy
    if activation == "silu":
        dpre = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        conv1d_fwd_kernel[grid](
            x, weight, x if bias is None else bias, state, x, x, dy, dpre,
            length, d, W=width, HAS_BIAS=bias is not None, HAS_STATE=initial_state is not None,
            SILU=True, DPRE=True, EMU=emu, BL=bl, BD=bd, BW=bw, num_warps=4,
        )
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    tiles = min(_TILES_PER_SPAN, grid[0])
    grid_bwd = (triton.cdiv(length, tiles * bl), b, grid[2])
    parts = b * grid_bwd[0]
    dw_part = torch.empty(parts, width, d, **f32)
    db_part = torch.empty(parts, d, **f32)
    dstate = torch.empty(b, d, width - 1, **f32) if initial_state is not None else db_part
    conv1d_bwd_kernel[grid_bwd](
        dpre, x, weight, state, dfinal, dx, dw_part, db_part, dstate,
        length, d, W=width, HAS_STATE=initial_state is not None, EMU=emu, TILES=tiles,
        BL=bl, BD=bd, BW=bw, BK=triton.next_power_of_2(width), num_warps=4,
    )
    return {
        "x": dx,
        "weight": dw_part.sum(0).t().to(weight.dtype).contiguous(),
        "bias": None if bias is None else db_part.sum(0).to(bias.dtype),
        "initial_state": None if initial_state is None else dstate.to(initial_state.dtype),
    }
