"""Triton kernels of the Mamba-1 selective scan: one forward and one backward kernel.

The launch side, the tile-size policy and the design notes are in ``triton.py``. Shapes (all
contiguous, channel-last): ``u, delta, z, y [B, L, D]``, ``B, C [B, L, G, N]``, ``A [D, N]``,
``D, delta_bias [D]``, states ``[B, D, N]``, checkpoints ``[B, n_ckpt, D, N]``.

Notation inside the kernels: one program owns batch ``b`` and channels ``d0 .. d0 + BD``; a tile
is ``BT`` consecutive positions; register tensors are ``[BT, BD]`` (per token and channel) or
``[BT, BD, BN]`` (per token, channel and state). The recurrence ``h_t = a_t * h_{t-1} + x_t`` is
solved inside a tile with ``tl.associative_scan`` over pairs ``(a, x)`` along the tile axis, the
state entering the tile folded into the first element.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._triton_math import sigmoid as _sigmoid, softplus as _softplus

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) followed by (a2, x2): h -> a2 * (a1 * h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _load_dt(delta_ptr, tok, m2, bias, SOFTPLUS: tl.constexpr):
    """``[BT, BD]`` step sizes (0 where masked) and the pre-softplus argument ``delta + bias``."""
    raw = tl.load(delta_ptr + tok, mask=m2, other=0.0).to(tl.float32) + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(m2, dt, 0.0), raw


@triton.jit
def _load_group(ptr, t, mask_t, d, mask_d, n, mask_n, g_one, G, N, CPG, ONE_GROUP: tl.constexpr):
    """B or C (``ptr`` at this batch row) for the tile's positions ``t`` as float32: ``[BT, 1, BN]``
    if the whole channel block reads group ``g_one``, else gathered per channel ``[BT, BD, BN]``
    (group ``d // CPG``)."""
    if ONE_GROUP:
        off = (t * G + g_one)[:, None] * N + n[None, :]
        v = tl.load(ptr + off, mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        v = v[:, None, :]
    else:
        off = (t[:, None] * G + (d // CPG)[None, :])[:, :, None] * N + n[None, None, :]
        m = (mask_t[:, None] & mask_d[None, :])[:, :, None] & mask_n[None, None, :]
        v = tl.load(ptr + off, mask=m, other=0.0).to(tl.float32)
    return v


@triton.jit
def _tile_states(h, t, mask_t, d, mask_d, n, mask_n, g_one, A2, bias,
                 u_ptr, delta_ptr, B_ptr, Dm, G, N, CPG,
                 SOFTPLUS: tl.constexpr, ONE_GROUP: tl.constexpr, BT: tl.constexpr):
    """States after each position of the tile, ``H [BT, BD, BN]``, from the state ``h [BD, BN]``
    before it; also the loaded ``u``, ``dt`` ``[BT, BD]`` and the state after the tile.

    Masked positions (t >= L) are identity steps (a = 1, x = 0), so the last row is the state
    after the last valid position. Pointers are at this program's batch row."""
    tok = t[:, None] * Dm + d[None, :]
    m2 = mask_t[:, None] & mask_d[None, :]
    u = tl.load(u_ptr + tok, mask=m2, other=0.0).to(tl.float32)
    dt, _ = _load_dt(delta_ptr, tok, m2, bias, SOFTPLUS)
    Bt = _load_group(B_ptr, t, mask_t, d, mask_d, n, mask_n, g_one, G, N, CPG, ONE_GROUP)
    a = tl.exp2(dt[:, :, None] * A2)
    x = (dt * u)[:, :, None] * Bt
    i3 = tl.arange(0, BT)[:, None, None]
    x = tl.where(i3 == 0, a * h[None, :, :] + x, x)
    _, H = tl.associative_scan((a, x), 0, _combine)
    h_out = tl.sum(tl.where(i3 == BT - 1, H, 0.0), axis=0)
    return H, u, dt, h_out, tok, m2


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, saved_ptr,
    L, Dm, G, N, CPG, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, ONE_GROUP: tl.constexpr,
    CKPT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, I64: tl.constexpr,
):
    """Grid ``(B, cdiv(D, BD))``. Writes ``y``, the final state and (if SAVE) the state before
    every ``CKPT``-th position."""
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    # move every pointer to this batch row once: the offsets inside a row fit in int32
    tok_row = b * L * Dm
    u_ptr += tok_row
    delta_ptr += tok_row
    z_ptr += tok_row
    y_ptr += tok_row
    B_ptr += b * L * G * N
    C_ptr += b * L * G * N
    h0_ptr += b * Dm * N
    hT_ptr += b * Dm * N
    saved_ptr += b * n_chunks * Dm * N

    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    i = tl.arange(0, BT)
    if I64:  # offsets inside a batch row reach 2**31: every position index becomes int64
        i = i.to(tl.int64)
    mask_d = d < Dm
    mask_n = n < N
    mdn = mask_d[:, None] & mask_n[None, :]
    sidx = d[:, None] * N + n[None, :]  # [BD, BN] offsets inside one [D, N] state
    g_one = (pid_d * BD) // CPG

    # padded channels/states get A = 0 and B = C = 0: their state stays 0 and adds nothing
    A2 = (tl.load(A_ptr + sidx, mask=mdn, other=0.0).to(tl.float32) * LOG2E)[None, :, :]
    bias = tl.zeros([1, BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    dskip = tl.zeros([1, BD], dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(Dskip_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + sidx, mask=mdn, other=0.0).to(tl.float32)

    for c in range(n_chunks):
        if SAVE:
            tl.store(saved_ptr + c * Dm * N + sidx, h, mask=mdn)
        for k in range(0, CKPT // BT):  # a runtime loop: unrolling only adds register pressure
            t0 = c * CKPT + k * BT
            if t0 < L:
                t = t0 + i
                mask_t = t < L
                H, u, dt, h, tok, m2 = _tile_states(
                    h, t, mask_t, d, mask_d, n, mask_n, g_one, A2, bias,
                    u_ptr, delta_ptr, B_ptr, Dm, G, N, CPG, SOFTPLUS, ONE_GROUP, BT,
                )
                Ct = _load_group(C_ptr, t, mask_t, d, mask_d, n, mask_n, g_one, G, N, CPG, ONE_GROUP)
                y = tl.sum(H * Ct, axis=2) + dskip * u
                if HAS_Z:
                    zz = tl.load(z_ptr + tok, mask=m2, other=0.0).to(tl.float32)
                    y = y * (zz * _sigmoid(zz))
                tl.store(y_ptr + tok, y.to(y_ptr.dtype.element_ty), mask=m2)
    tl.store(hT_ptr + sidx, h, mask=mdn)


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, z_ptr, bias_ptr,
    gy_ptr, gT_ptr, saved_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    Bsz, L, Dm, G, N, CPG, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_GT: tl.constexpr, SOFTPLUS: tl.constexpr, ONE_GROUP: tl.constexpr,
    CKPT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, I64: tl.constexpr,
):
    """Grid ``(B, cdiv(D, BD))``. Walks the checkpoint chunks from last to first:

    1. recompute the chunk's states from its saved start state, tile by tile in time order, into
       this program's scratch rows (row r = state before chunk position r; ``CKPT + 1`` rows);
    2. tile by tile from the chunk's end, with rows in *reversed* time order (row i is position
       ``t0 + BT - 1 - i``, so a plain forward scan runs backwards in time), solve the adjoint
       ``G_t = C_t dy_t + a_{t+1} G_{t+1}`` and form every gradient.

    The carry between tiles is ``K = a_t G_t`` at the tile's first position (the gradient of the
    state before it); it starts as the final state's cotangent and ends as ``dinitial_state``.
    dA, dD and ddelta_bias are summed over this program's positions and written per batch row;
    dB/dC are written per channel block (ONE_GROUP) or per channel; the host sums them.
    """
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_dblk = tl.num_programs(1)
    g_one = (pid_d * BD) // CPG
    split = ((pid_d * BD) % CPG) // BD  # index of this block among its group's blocks (ONE_GROUP)
    tok_row = b * L * Dm
    u_ptr += tok_row
    delta_ptr += tok_row
    z_ptr += tok_row
    gy_ptr += tok_row
    du_ptr += tok_row
    ddelta_ptr += tok_row
    dz_ptr += tok_row
    B_ptr += b * L * G * N
    C_ptr += b * L * G * N
    if ONE_GROUP:  # dB/dC partials [n_split, B, L, G, N]
        dB_ptr += (split * Bsz + b) * L * G * N
        dC_ptr += (split * Bsz + b) * L * G * N
    else:  # per channel [B, L, D, N]
        dB_ptr += tok_row * N
        dC_ptr += tok_row * N
    gT_ptr += b * Dm * N
    dh0_ptr += b * Dm * N
    dA_ptr += b * Dm * N
    dD_ptr += b * Dm
    dbias_ptr += b * Dm
    saved_ptr += b * n_chunks * Dm * N
    # scratch: [CKPT + 1, BD, BN] float32 private to this program (padded, so no masks on d/n)
    SROW: tl.constexpr = BD * BN
    scratch_ptr += (b * n_dblk + pid_d) * (CKPT + 1) * SROW

    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    i = tl.arange(0, BT)
    if I64:  # offsets inside a batch row reach 2**31: every position index becomes int64
        i = i.to(tl.int64)
    mask_d = d < Dm
    mask_n = n < N
    mdn = mask_d[:, None] & mask_n[None, :]
    sidx = d[:, None] * N + n[None, :]
    sloc = tl.arange(0, BD)[:, None] * BN + n[None, :]
    sloc3 = sloc[None, :, :]
    i3 = i[:, None, None]

    A = tl.load(A_ptr + sidx, mask=mdn, other=0.0).to(tl.float32)[None, :, :]
    A2 = A * LOG2E
    bias = tl.zeros([1, BD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    dskip = tl.zeros([1, BD], dtype=tl.float32)
    if HAS_D:
        dskip = tl.load(Dskip_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    K = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_GT:
        K = tl.load(gT_ptr + sidx, mask=mdn, other=0.0).to(tl.float32)

    dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)

    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        # -- 1. recompute the chunk's states (time order) into scratch
        h = tl.load(saved_ptr + c * Dm * N + sidx, mask=mdn, other=0.0)
        tl.store(scratch_ptr + sloc, h)
        for k in range(0, CKPT // BT):
            t0 = c * CKPT + k * BT
            if t0 < L:
                t = t0 + i
                mask_t = t < L
                H, _u, _dt, h, _tok, _m2 = _tile_states(
                    h, t, mask_t, d, mask_d, n, mask_n, g_one, A2, bias,
                    u_ptr, delta_ptr, B_ptr, Dm, G, N, CPG, SOFTPLUS, ONE_GROUP, BT,
                )
                rows = (k * BT + 1 + i)[:, None, None]
                tl.store(scratch_ptr + rows * SROW + sloc3, H, mask=mask_t[:, None, None])
        tl.debug_barrier()  # scratch written by all threads before any thread reads it

        # -- 2. adjoint, tiles from last to first, rows in reversed time order
        for kk in range(0, CKPT // BT):
            k = CKPT // BT - 1 - kk
            t0 = c * CKPT + k * BT
            if t0 < L:
                t = t0 + BT - 1 - i
                mask_t = t < L
                tok = t[:, None] * Dm + d[None, :]
                m2 = mask_t[:, None] & mask_d[None, :]
                m3 = mask_t[:, None, None]
                u = tl.load(u_ptr + tok, mask=m2, other=0.0).to(tl.float32)
                dt, raw = _load_dt(delta_ptr, tok, m2, bias, SOFTPLUS)
                gy = tl.load(gy_ptr + tok, mask=m2, other=0.0).to(tl.float32)
                r = (t - c * CKPT)[:, None, None]  # scratch row of h_{t-1}; h_t is the next row

                # gate and output: y_pre, dz, dy, dC (each [BT, BD, BN] tile is used, then dropped)
                H = tl.load(scratch_ptr + (r + 1) * SROW + sloc3, mask=m3, other=0.0)
                Ct = _load_group(C_ptr, t, mask_t, d, mask_d, n, mask_n, g_one, G, N, CPG, ONE_GROUP)
                dy = gy
                if HAS_Z:
                    y_pre = tl.sum(H * Ct, axis=2) + dskip * u
                    zz = tl.load(z_ptr + tok, mask=m2, other=0.0).to(tl.float32)
                    sig = _sigmoid(zz)
                    dy = gy * (zz * sig)
                    dzv = gy * y_pre * (sig * (1.0 + zz * (1.0 - sig)))
                    tl.store(dz_ptr + tok, dzv.to(dz_ptr.dtype.element_ty), mask=m2)
                dCc = H * dy[:, :, None]
                if ONE_GROUP:  # sum over this block's channels -> [BT, BN] at [split, b, t, g, :]
                    goff = (t * G + g_one)[:, None] * N + n[None, :]
                    gm = mask_t[:, None] & mask_n[None, :]
                    tl.store(dC_ptr + goff, tl.sum(dCc, axis=1), mask=gm)
                else:  # per channel -> [b, t, d, :], the host sums each group's channels
                    coff = tok[:, :, None] * N + n[None, None, :]
                    cm = m2[:, :, None] & mask_n[None, None, :]
                    tl.store(dC_ptr + coff, dCc, mask=cm)
                x = Ct * dy[:, :, None]

                # adjoint scan. alpha = decay of the step after t (row i - 1); 1 in row 0 (the
                # carry K is already decayed) and past the sequence end (the final state's
                # cotangent is not decayed)
                m2n = ((i > 0) & (t + 1 < L))[:, None] & mask_d[None, :]
                dt_next, _ = _load_dt(delta_ptr, tok + Dm, m2n, bias, SOFTPLUS)
                alpha = tl.exp2(dt_next[:, :, None] * A2)
                x = tl.where(i3 == 0, x + K[None, :, :], x)
                _, Gt = tl.associative_scan((alpha, x), 0, _combine)  # G_t: gradient of h_t

                # gradients through x_t = dt u B: du, dB and half of ddt
                Bt = _load_group(B_ptr, t, mask_t, d, mask_d, n, mask_n, g_one, G, N, CPG, ONE_GROUP)
                sGB = tl.sum(Gt * Bt, axis=2)
                dBc = Gt * (dt * u)[:, :, None]
                if ONE_GROUP:
                    tl.store(dB_ptr + goff, tl.sum(dBc, axis=1), mask=gm)
                else:
                    tl.store(dB_ptr + coff, dBc, mask=cm)
                du = dt * sGB + dskip * dy
                tl.store(du_ptr + tok, du.to(du_ptr.dtype.element_ty), mask=m2)
                dD_acc += tl.sum(dy * u, axis=0)  # u = 0 on masked rows

                # gradients through a_t = exp(dt A): carry, dA and the other half of ddt
                Kt = tl.exp2(dt[:, :, None] * A2) * Gt  # gradient of h_{t-1} through h_t
                K = tl.sum(tl.where(i3 == BT - 1, Kt, 0.0), axis=0)  # row BT-1 is position t0
                h_prev = tl.load(scratch_ptr + r * SROW + sloc3, mask=m3, other=0.0)
                gh = Kt * h_prev
                dA_acc += tl.sum(gh * dt[:, :, None], axis=0)  # dt = 0 on masked rows
                ddt = tl.sum(gh * A, axis=2) + sGB * u
                ddelta = ddt
                if SOFTPLUS:
                    ddelta = ddt * _sigmoid(raw)
                tl.store(ddelta_ptr + tok, ddelta.to(ddelta_ptr.dtype.element_ty), mask=m2)
                dbias_acc += tl.sum(tl.where(m2, ddelta, 0.0), axis=0)
        tl.debug_barrier()  # all reads of this chunk's scratch done before the next chunk overwrites it

    if HAS_H0:
        tl.store(dh0_ptr + sidx, K, mask=mdn)
    tl.store(dA_ptr + sidx, dA_acc, mask=mdn)
    tl.store(dD_ptr + d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + d, dbias_acc, mask=mask_d)
