"""Triton backend of the Mamba-2 SSD scan (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Imported only when the ``triton`` backend runs (``import mz_kernels`` never imports it); the kernels
are in ``triton_kernels.py``. Same contract as ``chunked.py``: ``ssd_triton_fwd`` returns
``(y, final_state)`` and ``ssd_triton_bwd`` the gradient dict of ``ssd_chunked_bwd``.

Forward, the chunked form of ``mamba_chunk_scan_combined`` (chunks of ``Q`` positions):

1. ``ssd_cumsum_kernel``: ``delta = softplus(dt + dt_bias)`` and its in-chunk cumulative
   log-decay ``cum = cumsum(delta * A)``, float32 ``[B, H, nc, Q]``.
2. ``ssd_bmm_kernel``: ``CB = C B^T`` per chunk and group, float32 ``[B, nc, G, Q, Q]``.
3. ``ssd_chunk_state_kernel``: each chunk's own state at its end, ``[B, nc, H, P, N]``.
4. ``ssd_state_passing_kernel``: the sequential float32 pass over chunks, in place: each chunk's
   slot becomes the state entering it; the last update is the final state.
5. ``ssd_chunk_scan_kernel``: ``y = (CB * decay) (delta x) + exp(cum) C state_in`` plus ``D x``,
   times ``silu(z)``.

Backward (custom ops keep no activations, so 1-4 are recomputed; nothing of size
``[B, L, H, P, N]`` is formed, the largest buffers are the ``[B, nc, H, P, N]`` chunk states):

* with ``z``: ``ssd_chunk_scan_kernel`` in ``GATE_BWD`` mode recomputes ``y0 = y / silu(z)`` and
  writes ``dz`` and ``dY = dy * silu(z)`` (float32); without ``z``, ``dY = dy``;
* ``ssd_chunk_state_kernel`` (adjoint) + ``ssd_state_passing_kernel`` (reverse, from ``dfinal``):
  the gradient of the state leaving every chunk, and ``dinitial_state``;
* ``ssd_bwd_dx_kernel`` (per chunk and head): ``dx``, ``ddt`` and partial ``dA``/``dD``;
* ``ssd_bwd_dbc_kernel`` (per chunk, group and head split): partial ``dB``/``dC``;
* torch sums the partials (``dA``, ``dD``, ``ddt_bias``, ``dB``/``dC`` over head splits) in a fixed
  order: deterministic, no atomics.

Numerics: every exponential, the states and all accumulation are float32. When ``x``, ``B`` and
``C`` are all bfloat16 (or all float16) the matrix products run on tensor cores (``tl.dot`` with
float32 accumulation); an operand that holds float32 values (a decay-scaled matrix, a state, the
gated ``dY``) is split into a 16-bit ``hi + lo`` pair with one extra product for ``lo``, so the
products keep ~16 significant bits (without it, global reductions such as ``ddt_bias`` lose the
5e-3 budget). float16 states beyond 65504 would overflow the 16-bit operands. Otherwise (float32 or
mixed dtypes) the products run in IEEE float32 (no TF32). ``float64`` inputs (gradcheck) are
delegated to the ``chunked`` backend.

Sizes (``pick_config``; checked against ptxas's sm_90 register report, not timed on hardware):
``Q`` is ``chunk_size`` rounded down to a power of two in [16, 64] (16-bit) or [16, 32] (float32);
the result does not depend on it beyond rounding (exponents are differences of in-chunk cumulative
sums, as in mamba_ssm, so a term's relative error grows like ``ulp(|cum|)``: tiny terms at very
large ``delta * |A|`` are less exact than in ``chunked``), but a whole ``[Q, Q]`` tile lives in one
program,
so larger chunks would need tiling inside the chunk (mamba_ssm runs 256 with 64-row blocks; at
``Q = 64`` the float32 chunk-state buffers are 4x theirs). ``P`` and ``N`` are looped in tiles of
64 in the forward and 32 in the backward (32 everywhere for float32), at least 16 (``tl.dot``'s
minimum); 8 warps for the kernels with products, 4 for cumsum and state passing. The dB/dC kernel
splits each group's heads over ``S`` programs when there would be fewer than two programs per SM.
No tile grows with ``P`` or ``N``, so neither is limited.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .chunked import ssd_chunked, ssd_chunked_bwd
from .triton_kernels import (
    ssd_bmm_kernel,
    ssd_bwd_dbc_kernel,
    ssd_bwd_dx_kernel,
    ssd_chunk_scan_kernel,
    ssd_chunk_state_kernel,
    ssd_cumsum_kernel,
    ssd_state_passing_kernel,
)

__all__ = ["SSDTritonConfig", "pick_config", "ssd_triton_fwd", "ssd_triton_bwd"]

# Tile limits: with these, ptxas (sm_90) reports no register spills for the forward kernels and
# at most ~200 bytes for the backward ones (see tests/kernels/test_triton_ssd_conv.py).
_MIN_CHUNK, _MAX_CHUNK, _MAX_CHUNK_F32 = 16, 64, 32
_TILE, _TILE_BWD, _TILE_F32 = 64, 32, 32  # P / N tiles: 16-bit forward, 16-bit backward, float32
_WARPS, _WARPS_SMALL = 8, 4
_PASS_BLOCK = 256  # state elements per program of the state passing
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class SSDTritonConfig:
    """Launch configuration of one SSD call (block sizes are powers of two)."""

    chunk: int  # Q
    block_p: int  # head-dim tile of the forward kernels
    block_n: int  # state tile of the forward kernels (looped over N)
    block_p_bwd: int  # head-dim tile of the dx / dB-dC kernels (looped over P)
    block_n_bwd: int  # state tile of the dx / dB-dC kernels
    head_splits: int  # S: programs per group in the dB/dC kernel
    warps: int  # kernels with matrix products
    warps_small: int  # cumsum and state passing


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_config(
    batch: int, length: int, heads: int, groups: int, headdim: int, dstate: int, chunk_size: int,
    tensor_cores: bool = True, sm_count: int | None = None,
) -> SSDTritonConfig:
    """Block sizes for ``x [batch, length, heads, headdim]`` and ``B [*, *, groups, dstate]``.

    Args:
        tensor_cores: 16-bit products (else IEEE float32 ones, which take smaller tiles).
        sm_count: streaming multiprocessors of the target GPU, or ``None`` (interpreter: one head
            split).
    """
    if tensor_cores:
        max_chunk, tile, tile_bwd = _MAX_CHUNK, _TILE, _TILE_BWD
    else:
        max_chunk, tile, tile_bwd = _MAX_CHUNK_F32, _TILE_F32, _TILE_F32
    q = min(max_chunk, max(_MIN_CHUNK, _pow2_floor(chunk_size)))
    p2, n2 = max(16, triton.next_power_of_2(headdim)), max(16, triton.next_power_of_2(dstate))
    bn_bwd = min(tile_bwd, n2)
    nc = triton.cdiv(length, q)
    splits = 1
    if sm_count is not None:  # at least two dB/dC programs per SM when there are heads to split
        progs = batch * nc * groups * triton.cdiv(dstate, bn_bwd)
        splits = max(1, min(heads // groups, triton.cdiv(2 * sm_count, progs)))
    return SSDTritonConfig(q, min(tile, p2), min(tile, n2), min(tile_bwd, p2), bn_bwd, splits, _WARPS, _WARPS_SMALL)


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _dot_mode(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[object, int]:
    """``(DOT, MM)`` of the kernels: tensor cores when x, B, C share a 16-bit dtype."""
    if x.dtype in _TL_DTYPES and B.dtype == x.dtype and C.dtype == x.dtype:
        emulate = triton_interpreted() and x.dtype == torch.bfloat16
        return _TL_DTYPES[x.dtype], 2 if emulate else 1
    return tl.float32, 0


@dataclass
class _Run:
    """Shapes, configuration and the float32 buffers shared by the forward and backward."""

    b: int
    length: int
    h: int
    p: int
    g: int
    n: int
    nc: int
    cfg: SSDTritonConfig
    dot: object
    mm: int
    seg: torch.Tensor | None  # [B, L] int32
    delta: torch.Tensor  # [B, H, nc, Q]
    cum: torch.Tensor  # [B, H, nc, Q]
    cb: torch.Tensor  # [B, nc, G, Q, Q]

    @property
    def dims(self) -> tuple[int, ...]:
        return self.length, self.h, self.g, self.p, self.n, self.nc, self.h // self.g


def _prepare(x, dt, A, B, C, chunk_size, dt_bias, dt_softplus, seq_idx, head_splits=None) -> _Run:
    """Steps 1 and 2 of the forward (``delta``, ``cum``, ``CB``) and the segment ids."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    sm = _sm_count(x.device.index or 0) if x.device.type == "cuda" else None
    dot, mm = _dot_mode(x, B, C)
    cfg = pick_config(b, length, h, g, p, n, chunk_size, mm != 0, sm)
    if head_splits is not None:
        cfg = SSDTritonConfig(**{**cfg.__dict__, "head_splits": head_splits})
    q = cfg.chunk
    nc = triton.cdiv(length, q)
    seg = None
    if seq_idx is not None:  # running count of id changes: equal ids <=> no reset in between
        seg = torch.zeros(seq_idx.shape, dtype=torch.int32, device=x.device)
        seg[:, 1:] = torch.cumsum(seq_idx[:, 1:] != seq_idx[:, :-1], dim=1, dtype=torch.int32)
    f32 = dict(dtype=torch.float32, device=x.device)
    delta = torch.empty(b, h, nc, q, **f32)
    cum = torch.empty(b, h, nc, q, **f32)
    bh = min(16, triton.next_power_of_2(h))
    ssd_cumsum_kernel[(b * nc, triton.cdiv(h, bh))](
        dt, A, dt if dt_bias is None else dt_bias, delta, cum, length, h, nc,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, Q=q, BH=bh, num_warps=cfg.warps_small,
    )
    cb = torch.empty(b, nc, g, q, q, **f32)
    ssd_bmm_kernel[(b * nc, g)](C, B, cb, length, g, n, nc, Q=q, BN=cfg.block_n, DOT=dot, MM=mm, num_warps=cfg.warps)
    return _Run(b, length, h, p, g, n, nc, cfg, dot, mm, seg, delta, cum, cb)


def _chunk_states(run: _Run, X: torch.Tensor, Y: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """Step 3 (``X = x, Y = B``) or its adjoint (``X = dY, Y = C``): ``[B, nc, H, P, N]``."""
    cfg = run.cfg
    out = torch.empty(run.b, run.nc, run.h, run.p, run.n, dtype=torch.float32, device=X.device)
    grid = (run.b * run.nc, run.h, triton.cdiv(run.p, cfg.block_p) * triton.cdiv(run.n, cfg.block_n))
    ssd_chunk_state_kernel[grid](
        X, Y, run.delta, run.cum, X if run.seg is None else run.seg, out, *run.dims,
        ADJOINT=adjoint, HAS_SEQ=run.seg is not None, Q=cfg.chunk, BP=cfg.block_p, BN=cfg.block_n,
        DOT=run.dot, MM=run.mm, num_warps=cfg.warps,
    )
    return out


def _pass_states(run: _Run, states: torch.Tensor, init: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """Step 4 in place on ``states``; returns the state after the pass ``[B, H, P, N]`` float32."""
    pn = run.p * run.n
    last = torch.empty(run.b, run.h, run.p, run.n, dtype=torch.float32, device=states.device)
    block = min(_PASS_BLOCK, triton.next_power_of_2(pn))
    ssd_state_passing_kernel[(run.b, run.h, triton.cdiv(pn, block))](
        states, run.cum, states if run.seg is None else run.seg, states if init is None else init, last,
        run.length, run.h, run.nc, pn,
        HAS_INIT=init is not None, HAS_SEQ=run.seg is not None, REVERSE=reverse, Q=run.cfg.chunk, BLOCK=block,
        num_warps=run.cfg.warps_small,
    )
    return last


def _scan_kernel_args(run, x, z, D, C, states):
    return (x, x if z is None else z, x if D is None else D, C, run.cb, states, run.delta, run.cum,
            x if run.seg is None else run.seg)


def _d_flags(D: torch.Tensor | None) -> dict:
    return dict(HAS_D=D is not None, D_VEC=D is not None and D.dim() == 1)


def ssd_triton_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton SSD scan (inputs validated by ``ssd_scan``); same contract as ``ssd_chunked``.

    Returns:
        ``(y [B, L, H, P] in x.dtype, final_state [B, H, P, N] float32)``.
    """
    if x.dtype == torch.float64:
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                           dt_softplus=dt_softplus, initial_state=initial_state, seq_idx=seq_idx)
    with _on_device(x):
        return _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx)


def _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    run = _prepare(x, dt, A, B, C, chunk_size, dt_bias, dt_softplus, seq_idx)
    states = _chunk_states(run, x, B, adjoint=False)
    final = _pass_states(run, states, initial_state, reverse=False)
    y = torch.empty_like(x)
    cfg = run.cfg
    ssd_chunk_scan_kernel[(run.b * run.nc, run.h, triton.cdiv(run.p, cfg.block_p))](
        *_scan_kernel_args(run, x, z, D, C, states), y, x, x, x, *run.dims,
        HAS_Z=z is not None, GATE_BWD=False, HAS_SEQ=run.seg is not None, Q=cfg.chunk, BP=cfg.block_p,
        BN=cfg.block_n, DOT=run.dot, MM=run.mm, EMU=triton_interpreted(), num_warps=cfg.warps, **_d_flags(D),
    )
    return y, final


def ssd_triton_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    head_splits: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Backward of :func:`ssd_triton_fwd` (recomputes the forward's chunk quantities).

    Args:
        dy: ``[B, L, H, P]`` cotangent of ``y``; dfinal: ``[B, H, P, N]`` cotangent of the final state.
        head_splits: override of the configuration's head splits of the dB/dC kernel (tests).

    Returns:
        Gradients keyed ``x, dt, A, B, C, D, z, dt_bias, initial_state`` (``None`` for absent
        inputs), each in the dtype of its input.
    """
    kw = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
              initial_state=initial_state, seq_idx=seq_idx)
    if x.dtype == torch.float64:
        return ssd_chunked_bwd(dy, dfinal, x, dt, A, B, C, **kw)
    with _on_device(x):  # cotangents may be expanded views (e.g. of y.sum()): the kernels need them dense
        return _backward(dy.contiguous(), dfinal.contiguous(), x, dt, A, B, C, head_splits, **kw)


def _backward(dy, dfinal, x, dt, A, B, C, head_splits, *, chunk_size, D, z, dt_bias, dt_softplus, initial_state,
              seq_idx):
    run = _prepare(x, dt, A, B, C, chunk_size, dt_bias, dt_softplus, seq_idx, head_splits)
    cfg, dims = run.cfg, run.dims
    f32 = dict(dtype=torch.float32, device=x.device)
    emu = triton_interpreted()
    has_seq = run.seg is not None
    seg = x if run.seg is None else run.seg
    sin = _chunk_states(run, x, B, adjoint=False)
    _pass_states(run, sin, initial_state, reverse=False)

    dz = None
    dY = dy
    if z is not None:
        dz = torch.empty_like(z)
        dY = torch.empty(x.shape, **f32)
        ssd_chunk_scan_kernel[(run.b * run.nc, run.h, triton.cdiv(run.p, cfg.block_p))](
            *_scan_kernel_args(run, x, z, D, C, sin), x, dy, dY, dz, *dims,
            HAS_Z=True, GATE_BWD=True, HAS_SEQ=has_seq, Q=cfg.chunk, BP=cfg.block_p, BN=cfg.block_n,
            DOT=run.dot, MM=run.mm, EMU=emu, num_warps=cfg.warps, **_d_flags(D),
        )
    dy_f32 = dY.dtype != x.dtype  # dY holds values that are not exact in the dot dtype
    gout = _chunk_states(run, dY, C, adjoint=True)
    dinit = _pass_states(run, gout, dfinal, reverse=True)

    dx = torch.empty_like(x)
    ddt = torch.empty(run.b, run.length, run.h, **f32)
    dA_part = torch.empty(run.b, run.nc, run.h, **f32)
    dD_part = torch.empty(run.b, run.nc, run.h, run.p, **f32) if D is not None else dA_part
    ssd_bwd_dx_kernel[(run.b * run.nc, run.h)](
        x, dt, dt if dt_bias is None else dt_bias, A, x if D is None else D, dY, B, C, run.cb, sin, gout,
        run.delta, run.cum, seg, dx, ddt, dA_part, dD_part, *dims,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, DY_F32=dy_f32, HAS_SEQ=has_seq, Q=cfg.chunk,
        BP=cfg.block_p_bwd, BN=cfg.block_n_bwd, DOT=run.dot, MM=run.mm, EMU=emu, num_warps=cfg.warps,
        **_d_flags(D),
    )
    splits = cfg.head_splits
    hps = triton.cdiv(run.h // run.g, splits)
    dB_part = torch.empty(splits, run.b, run.length, run.g, run.n, **f32)
    dC_part = torch.empty_like(dB_part)
    ssd_bwd_dbc_kernel[(run.b * run.nc, run.g * splits, triton.cdiv(run.n, cfg.block_n_bwd))](
        x, dY, B, C, sin, gout, run.delta, run.cum, seg, dB_part, dC_part,
        run.b, *dims, hps, splits,
        DY_F32=dy_f32, HAS_SEQ=has_seq, Q=cfg.chunk, BP=cfg.block_p_bwd, BN=cfg.block_n_bwd, DOT=run.dot,
        MM=run.mm, num_warps=cfg.warps,
    )

    grads: dict[str, torch.Tensor | None] = {
        "x": dx,
        "dt": ddt.to(dt.dtype),
        "A": dA_part.sum((0, 1)).to(A.dtype),
        "B": dB_part.sum(0).to(B.dtype),
        "C": dC_part.sum(0).to(C.dtype),
        "D": None,
        "z": dz,
        "dt_bias": None if dt_bias is None else ddt.sum((0, 1)).to(dt_bias.dtype),
        "initial_state": None if initial_state is None else dinit.to(initial_state.dtype),
    }
    if D is not None:
        dD = dD_part.sum((0, 1))
        grads["D"] = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    return grads
