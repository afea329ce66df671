"""Triton backend of the selective scan (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Imported only when the ``triton`` backend runs (``import mz_kernels`` never imports it). Implements
the backend contract of ``_common.py``; the kernels are in ``triton_kernels.py``.

Design:

* **Grid** ``(B, cdiv(D, BD))``: one program per batch row and block of ``BD`` channels. Channels
  are the contiguous axis of ``[B, L, D]``, so each ``[BT, BD]`` token tile is ``BT`` coalesced row
  segments.
* **Time** is walked in checkpoint chunks of ``CKPT = 64`` positions, each split in tiles of ``BT``
  positions (8 or 16; it divides 64). Inside a tile the ``[BT, BD, BN]`` recurrence is solved by
  ``tl.associative_scan`` over ``(a, x)`` pairs (parallel in time, depth ``log2 BT``), the state
  ``[BD, BN]`` entering the tile is folded into the first pair and carried in registers between
  tiles. One load latency is paid per tile, not per position.
* **Numerics**: float32 everywhere inside; ``a = exp2(dt * A * log2 e)`` with ``A * log2 e`` loaded
  once; ``softplus(delta + delta_bias)`` as ``max(x, 0) + log1p(exp(-|x|))``; D skip and the
  ``silu(z)`` gate fused; ``y`` and the token gradients are stored in the inputs' dtypes.
* **Groups**: channel d reads group ``d // (D / G)``. When a channel block lies inside one group
  (``ONE_GROUP``: ``BD`` divides ``D / G``, or ``G = 1``) B/C are loaded once per position as
  ``[BT, BN]`` and dB/dC are summed over the block in registers, giving partials
  ``[cdiv(D/G, BD), B, L, G, N]`` that the host sums (deterministic, no atomics). Otherwise (for
  example ``D / G`` odd, or ``G = D`` from the time-invariant adapter layout) B/C are gathered per
  channel and dB/dC written per channel ``[B, L, D, N]``, then summed per group on the host.
* **Backward**: chunks from last to first. For each chunk the states are recomputed from the saved
  chunk start into a per-program float32 scratch of ``CKPT + 1`` states (``[B, cdiv(D, BD), 65,
  BD, BN]``, about 66 KB per program at ``BD * BN = 256``; it is rewritten every chunk, so it should
  stay in L2, which is not measured). The adjoint then runs tile by tile from the chunk's end with
  every row in reversed time order (index arithmetic ``t = t0 + BT - 1 - i``, never
  ``associative_scan(reverse=True)``, which has an open Triton bug, triton-lang/triton#4362); the
  scratch gives each reversed row both ``h_{t-1}`` and ``h_t`` without shifting register tensors.
  The adjoint's decay ``a_{t+1}`` is recomputed from ``delta`` at ``t + 1`` (three exp2 per state
  element in the backward, one in the forward). dA, dD and ddelta_bias are written per batch row
  and summed on the host.
* **Tile sizes** (``pick_config``): ``BN = next_pow2(N)``; ``BD * BN <= 256``, and on CUDA ``BD`` is
  halved (down to ``BD * BN = 64``) until there are at least two programs per SM; ``num_warps =
  BD * BN / 32`` (1 to 8), i.e. one lane per (channel, state) pair holding the tile's positions;
  ``BT = 16`` in the forward, and 16 (N = 16) or 8 (other N) in the backward, whose ~12 live tiles
  otherwise spill. These were checked by compiling for sm_90 without a GPU (``ptxas -v``: at most
  ~20 bytes of spills in the forward, ~300 in the backward); they are not timed on hardware.
* **Offsets** inside one batch row are int32 (every pointer is first moved to its batch row with
  int64 arithmetic); rows of ``2**31`` elements or more switch the kernels to int64 positions.
* **float64** inputs are delegated to the ``ref`` backend (the kernels are float32 only; float64
  exists for gradcheck). ``N > 256`` is rejected (the state tile would not fit in registers).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

from . import ref
from ._common import CKPT, cast_grads, n_ckpt, reduce_groups
from .triton_kernels import scan_bwd_kernel, scan_fwd_kernel

MAX_N = 256
INT64_OFFSETS_FROM = 2**31  # largest offset inside one batch row from which the kernels index in int64
_MAX_TILE_DN = 256  # BD * BN: one [BD, BN] state tile per program, one lane per (channel, state)
_MIN_TILE_DN = 64  # the occupancy rule stops halving BD here


@dataclass(frozen=True)
class TritonConfig:
    """Launch configuration of one scan call (all sizes are powers of two)."""

    block_t_fwd: int
    block_t_bwd: int
    block_d: int
    block_n: int
    one_group: bool
    num_warps: int


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_config(Bsz: int, Dm: int, N: int, G: int, sm_count: int | None = None) -> TritonConfig:
    """Tile sizes for ``[Bsz, *, Dm]`` tokens with ``N`` states and ``G`` groups.

    Args:
        sm_count: streaming multiprocessors of the target GPU, or ``None`` (interpreter: no
            occupancy rule).
    """
    bn = triton.next_power_of_2(N)
    bd = max(1, min(triton.next_power_of_2(Dm), _MAX_TILE_DN // bn))
    if sm_count is not None:  # at least two programs per SM when the problem is small
        while bd > 1 and bd * bn > _MIN_TILE_DN and Bsz * triton.cdiv(Dm, bd) < 2 * sm_count:
            bd //= 2
    cpg = Dm // G
    if G == 1:
        one_group = True
    else:
        fit = min(bd, cpg & -cpg)  # largest power of two dividing D / G, capped at bd
        one_group = fit * 4 >= bd or fit >= 32  # a narrower block is still worth skipping the gather
        if one_group:
            bd = fit
    # one lane per (channel, state) pair; each lane then holds the tile's BT positions
    num_warps = max(1, min(8, bd * bn // 32))
    # BT: positions per tile. The backward keeps ~12 tiles live; with these values it compiles for
    # sm_90 with at most ~300 bytes of register spills at BN = 1..256 (ptxas -v); not timed.
    bt_bwd = 16 if bn == 16 else 8
    return TritonConfig(16, bt_bwd, bd, bn, one_group, num_warps)


def _config_for(u: torch.Tensor, N: int, G: int) -> TritonConfig:
    if N > MAX_N:
        raise ValueError(f"selective_scan: backend 'triton' supports N <= {MAX_N} states (A.shape[1]), got {N}")
    sm = None
    if u.device.type == "cuda":
        sm = _sm_count(torch.cuda.current_device() if u.device.index is None else u.device.index)
    Bsz, _, Dm = u.shape
    return pick_config(Bsz, Dm, N, G, sm)


def _flags(u, B, D, z, delta_bias, initial_state):
    _, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    return dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=initial_state is not None,
        I64=L * Dm * N >= INT64_OFFSETS_FROM,  # the largest row: per-channel dB/dC partials [L, D, N]
    )


def _device_guard(u: torch.Tensor):
    """Launch on ``u``'s GPU (Triton uses the current device); a no-op on CPU (interpreter)."""
    return torch.cuda.device(u.device) if u.device.type == "cuda" else contextlib.nullcontext()


def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states):
    if u.dtype == torch.float64:
        return ref.forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states)
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    cfg = _config_for(u, N, G)
    nc = n_ckpt(L)
    y = torch.empty_like(u)
    final = torch.empty(Bsz, Dm, N, dtype=torch.float32, device=u.device)
    saved = torch.empty(Bsz, nc if save_states else 0, Dm, N, dtype=torch.float32, device=u.device)
    dummy = u  # stands in for absent optional tensors (never read: the HAS_* flags are constexpr)
    grid = (Bsz, triton.cdiv(Dm, cfg.block_d))
    with _device_guard(u):
        scan_fwd_kernel[grid](
            u, delta, A, B, C,
            dummy if D is None else D, dummy if z is None else z,
            dummy if delta_bias is None else delta_bias, dummy if initial_state is None else initial_state,
            y, final, saved if save_states else final,
            L, Dm, G, N, Dm // G, nc,
            SOFTPLUS=delta_softplus, SAVE=save_states, ONE_GROUP=cfg.one_group,
            CKPT=CKPT, BT=cfg.block_t_fwd, BD=cfg.block_d, BN=cfg.block_n,
            num_warps=cfg.num_warps, **_flags(u, B, D, z, delta_bias, initial_state),
        )
    return y, final, saved


def backward(grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.dtype == torch.float64:
        return ref.backward(grad_y, grad_final, saved, *ins, delta_softplus)
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    cfg = _config_for(u, N, G)
    if saved.shape[1] == 0:  # forward ran without grad bookkeeping: rebuild the checkpoints
        saved = forward(u, delta, A, B, C, D, None, delta_bias, initial_state, delta_softplus, True)[2]
    nc = n_ckpt(L)
    cpg = Dm // G
    n_dblk = triton.cdiv(Dm, cfg.block_d)
    dev, f32 = u.device, torch.float32
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    part_shape = (triton.cdiv(cpg, cfg.block_d), Bsz, L, G, N) if cfg.one_group else (Bsz, L, Dm, N)
    dB_part = torch.empty(part_shape, dtype=f32, device=dev)
    dC_part = torch.empty(part_shape, dtype=f32, device=dev)
    dA_part = torch.empty(Bsz, Dm, N, dtype=f32, device=dev)
    dD_part = torch.empty(Bsz, Dm, dtype=f32, device=dev)
    dbias_part = torch.empty(Bsz, Dm, dtype=f32, device=dev)
    dinit = None if initial_state is None else torch.empty(Bsz, Dm, N, dtype=f32, device=dev)
    scratch = torch.empty(Bsz, n_dblk, CKPT + 1, cfg.block_d, cfg.block_n, dtype=f32, device=dev)
    dummy = u
    with _device_guard(u):
        scan_bwd_kernel[(Bsz, n_dblk)](
            u, delta, A, B, C,
            dummy if D is None else D, dummy if z is None else z, dummy if delta_bias is None else delta_bias,
            grad_y, dummy if grad_final is None else grad_final, saved, scratch,
            du, ddelta, dummy if dz is None else dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
            dummy if dinit is None else dinit,
            Bsz, L, Dm, G, N, cpg, nc,
            HAS_GT=grad_final is not None, SOFTPLUS=delta_softplus, ONE_GROUP=cfg.one_group,
            CKPT=CKPT, BT=cfg.block_t_bwd, BD=cfg.block_d, BN=cfg.block_n,
            num_warps=cfg.num_warps, **_flags(u, B, D, z, delta_bias, initial_state),
        )
    if cfg.one_group:
        dB, dC = dB_part.sum(0), dC_part.sum(0)
    else:
        dB, dC = reduce_groups(dB_part, G), reduce_groups(dC_part, G)
    grads = (
        du, ddelta, dA_part.sum(0), dB, dC,
        None if D is None else dD_part.sum(0), dz,
        None if delta_bias is None else dbias_part.sum(0), dinit,
    )
    return cast_grads(grads, ins)
