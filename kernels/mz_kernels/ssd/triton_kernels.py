"""Triton kernels of the Mamba-2 SSD scan (forward and backward); the launch side is ``triton.py``.

Layouts (contiguous): ``x, dY [B, L, H, P]``, ``dt [B, L, H]``, ``B, C [B, L, G, N]``, ``seg [B, L]``
int32 segment ids (``seq_idx`` turned into a running count of its changes), and the float32
buffers ``delta, cum [B, H, nc, Q]`` (step size and its in-chunk cumulative log-decay),
``CB [B, nc, G, Q, Q]`` and chunk states ``[B, nc, H, P, N]``. Head ``h`` reads group ``h // R``.

Inside a program, ``i`` indexes rows (output positions) and ``j`` columns (source positions) of one
chunk of ``Q`` positions; positions past ``L`` are loaded as zeros and have ``delta = 0``, so they
add nothing and leave ``cum`` flat. Two positions of a chunk interact only when they lie in the same
segment (``seg`` equal); this is the state reset of ``seq_idx``.

Matrix products go through :func:`_mm`: ``MM = 0`` float32 operands (IEEE, for float32 inputs),
``MM = 1`` operands rounded to ``DOT`` (bfloat16/float16 tensor cores, float32 accumulation),
``MM = 2`` the same rounding emulated for the interpreter (its ``tl.dot`` reads bfloat16 operands
as raw integers in triton 3.6, and its float32 -> bfloat16 cast truncates instead of rounding).
``EMU`` makes the 16-bit stores round to nearest even under the interpreter as well.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._triton_math import SOFTPLUS_THRESHOLD
from .._triton_math import rne_bf16 as _rne_bf16
from .._triton_math import sigmoid as _sigmoid
from .._triton_math import softplus as _softplus
from .._triton_math import store as _store


@triton.jit
def _round(v, DOT: tl.constexpr, MM: tl.constexpr):
    """``v`` rounded to the 16-bit dot dtype (``MM = 2``: a float32 tensor holding the bfloat16 value)."""
    if MM == 2:
        return _rne_bf16(v.to(tl.float32))
    else:
        return v.to(DOT)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, MM: tl.constexpr, SA: tl.constexpr, SB: tl.constexpr):
    """``a @ b`` with float32 accumulation (see the module docstring for ``MM``).

    ``SA`` / ``SB``: the operand holds float32 values (not exact in the 16-bit dtype); it is split
    as ``hi + lo`` (both 16-bit) and ``lo`` gets its own product, so the result keeps ~16
    significant bits instead of ~8 (``hi @ hi + lo @ hi + hi @ lo``, dropping ``lo @ lo``).
    """
    if MM == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        ah = _round(a, DOT, MM)
        bh = _round(b, DOT, MM)
        acc = _dot16(ah, bh, MM)
        if SA:
            acc += _dot16(_round(a.to(tl.float32) - ah.to(tl.float32), DOT, MM), bh, MM)
        if SB:
            acc += _dot16(ah, _round(b.to(tl.float32) - bh.to(tl.float32), DOT, MM), MM)
        return acc


@triton.jit
def _dot16(a, b, MM: tl.constexpr):
    if MM == 2:  # operands already rounded; the interpreter multiplies them in float32
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _chunk_vectors(delta_ptr, cum_ptr, seg_ptr, b, c, h, L, H, nc, Q: tl.constexpr, HAS_SEQ: tl.constexpr):
    """``delta, cum, seg [Q]`` of chunk ``c`` of head ``h``, the chunk's last ``cum`` and the segment
    ids of its last position and of the position before it (0 for the first chunk)."""
    i = tl.arange(0, Q)
    base = ((b * H + h) * nc + c) * Q
    delta = tl.load(delta_ptr + base + i)
    cum = tl.load(cum_ptr + base + i)
    cum_last = tl.load(cum_ptr + base + Q - 1)  # padded positions have delta = 0: cum is flat there
    t = c * Q + i
    seg = tl.zeros([Q], dtype=tl.int32)
    seg_last = 0
    seg_prev = 0
    if HAS_SEQ:
        seg = tl.load(seg_ptr + b * L + t, mask=t < L, other=-1)
        seg_last = tl.load(seg_ptr + b * L + tl.minimum(c * Q + Q, L) - 1)
        seg_prev = tl.load(seg_ptr + b * L + tl.maximum(c * Q - 1, 0))  # seg[0] = 0
    return delta, cum, cum_last, seg, seg_last, seg_prev


@triton.jit
def _decay_matrix(cum, seg, Q: tl.constexpr, HAS_SEQ: tl.constexpr):
    """``[Q, Q]``: ``exp(cum_i - cum_j)`` for ``j <= i`` in one segment, else 0."""
    i = tl.arange(0, Q)
    keep = i[:, None] >= i[None, :]
    if HAS_SEQ:
        keep = keep & (seg[:, None] == seg[None, :])
    return tl.exp(tl.where(keep, cum[:, None] - cum[None, :], float("-inf")))


@triton.jit
def _edge_decays(cum, cum_last, seg, seg_last, seg_prev, HAS_SEQ: tl.constexpr):
    """``to_end [Q]`` (``exp(cum_last - cum_j)`` if ``j`` reaches the chunk end), ``from_start [Q]``
    (``exp(cum_i)`` if the state entering the chunk reaches ``i``) and ``carry`` (1 if the
    entering state reaches the chunk end, else 0)."""
    to_end = tl.exp(cum_last - cum)
    from_start = tl.exp(cum)
    carry = 1.0
    if HAS_SEQ:
        to_end = tl.where(seg == seg_last, to_end, 0.0)
        from_start = tl.where(seg == seg_prev, from_start, 0.0)
        carry = tl.where(seg_last == seg_prev, 1.0, 0.0)
    return to_end, from_start, carry


@triton.jit
def ssd_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, delta_ptr, cum_ptr,
    L, H, nc,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr, BH: tl.constexpr,
):
    """Grid ``(B * nc, cdiv(H, BH))``: ``delta = softplus(dt + bias)`` and ``cum = cumsum(delta * A)``
    over each chunk, written ``[B, H, nc, Q]`` (0 past ``L``)."""
    pid = tl.program_id(0)
    b = (pid // nc).to(tl.int64)
    c = pid % nc
    i = tl.arange(0, Q)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    t = c * Q + i
    m = (t < L)[:, None] & (h < H)[None, :]
    raw = tl.load(dt_ptr + (b * L + t)[:, None] * H + h[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
    delta = raw
    if SOFTPLUS:
        delta = _softplus(raw)
    delta = tl.where(m, delta, 0.0)
    A = tl.load(A_ptr + h, mask=h < H, other=0.0).to(tl.float32)
    cum = tl.cumsum(delta * A[None, :], axis=0)
    off = ((b * H + h[None, :]) * nc + c) * Q + i[:, None]
    mh = (h < H)[None, :] & (i >= 0)[:, None]
    tl.store(delta_ptr + off, delta, mask=mh)
    tl.store(cum_ptr + off, cum, mask=mh)


@triton.jit
def ssd_bmm_kernel(
    C_ptr, B_ptr, cb_ptr,
    L, G, N, nc,
    Q: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, MM: tl.constexpr,
):
    """Grid ``(B * nc, G)``: ``CB[i, j] = C_i . B_j`` for every pair of the chunk, float32."""
    pid = tl.program_id(0)
    b = (pid // nc).to(tl.int64)
    c = pid % nc
    bc = b * nc + c
    g = tl.program_id(1)
    i = tl.arange(0, Q)
    t = c * Q + i
    row = ((b * L + t) * G + g) * N
    acc = tl.zeros([Q, Q], dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        m = (t < L)[:, None] & (n < N)[None, :]
        ct = tl.load(C_ptr + row[:, None] + n[None, :], mask=m, other=0.0)
        bt = tl.load(B_ptr + row[:, None] + n[None, :], mask=m, other=0.0)
        acc += _mm(ct, tl.trans(bt), DOT, MM, False, False)
    tl.store(cb_ptr + ((bc * G + g) * Q + i[:, None]) * Q + i[None, :], acc)


@triton.jit
def ssd_chunk_state_kernel(
    X_ptr, Y_ptr, delta_ptr, cum_ptr, seg_ptr, out_ptr,
    L, H, G, P, N, nc, R,
    ADJOINT: tl.constexpr, HAS_SEQ: tl.constexpr,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, MM: tl.constexpr,
):
    """Grid ``(B * nc, H, cdiv(P, BP) * cdiv(N, BN))``: ``out[p, n] = sum_j w_j X_j[p] Y_j[n]`` per
    chunk, float32 ``[B, nc, H, P, N]``.

    Forward (``X = x``, ``Y = B``): ``w_j = delta_j * to_end_j``, the chunk's own contribution to the
    state at its end. Adjoint (``X = dY``, ``Y = C``): ``w_i = from_start_i``, the gradient the
    chunk's outputs send to the state entering it.
    """
    pid = tl.program_id(0)
    b = (pid // nc).to(tl.int64)
    c = pid % nc
    bc = b * nc + c
    h = tl.program_id(1)
    n_nb = tl.cdiv(N, BN)
    p = (tl.program_id(2) // n_nb) * BP + tl.arange(0, BP)
    n = (tl.program_id(2) % n_nb) * BN + tl.arange(0, BN)
    i = tl.arange(0, Q)
    t = c * Q + i
    mt = t < L
    delta, cum, cum_last, seg, seg_last, seg_prev = _chunk_vectors(
        delta_ptr, cum_ptr, seg_ptr, b, c, h, L, H, nc, Q, HAS_SEQ)
    to_end, from_start, _ = _edge_decays(cum, cum_last, seg, seg_last, seg_prev, HAS_SEQ)
    if ADJOINT:
        w = from_start
    else:
        w = delta * to_end
    xv = tl.load(X_ptr + ((b * L + t) * H + h)[:, None] * P + p[None, :],
                 mask=mt[:, None] & (p < P)[None, :], other=0.0).to(tl.float32)
    yv = tl.load(Y_ptr + ((b * L + t) * G + h // R)[:, None] * N + n[None, :],
                 mask=mt[:, None] & (n < N)[None, :], other=0.0)
    acc = _mm(tl.trans(xv * w[:, None]), yv, DOT, MM, True, False)
    off = (((bc * H + h) * P + p[:, None]) * N + n[None, :])
    tl.store(out_ptr + off, acc, mask=(p < P)[:, None] & (n < N)[None, :])


@triton.jit
def ssd_state_passing_kernel(
    states_ptr, cum_ptr, seg_ptr, init_ptr, final_ptr,
    L, H, nc, PN,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
    Q: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(B, H, cdiv(P * N, BLOCK))``: the sequential pass over chunks, in place.

    Forward: ``s_0 = init``; chunk ``c`` gets ``s_c`` (the state entering it) in place of its own
    contribution ``X_c``, then ``s_{c+1} = carry_c * exp(cum_last_c) * s_c + X_c``; ``final = s_nc``.
    ``REVERSE`` runs the chunks from last to first with the same update: fed the adjoint chunk
    contributions and ``init = dfinal``, it leaves in chunk ``c`` the gradient of the state leaving
    it and writes the gradient of the initial state to ``final``.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    e = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = e < PN
    s = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INIT:
        s = tl.load(init_ptr + (b * H + h) * PN + e, mask=m, other=0.0).to(tl.float32)
    for k in range(nc):
        if REVERSE:
            c = nc - 1 - k
        else:
            c = k
        off = ((b * nc + c) * H + h) * PN + e
        xc = tl.load(states_ptr + off, mask=m, other=0.0)
        tl.store(states_ptr + off, s, mask=m)
        decay = tl.exp(tl.load(cum_ptr + ((b * H + h) * nc + c) * Q + Q - 1))
        if HAS_SEQ:
            seg_last = tl.load(seg_ptr + b * L + tl.minimum(c * Q + Q, L) - 1)
            seg_prev = tl.load(seg_ptr + b * L + tl.maximum(c * Q - 1, 0))
            decay = tl.where(seg_last == seg_prev, decay, 0.0)
        s = decay * s + xc
    tl.store(final_ptr + (b * H + h) * PN + e, s, mask=m)


@triton.jit
def _state_rows(Y_ptr, S_ptr, y_row, mt, state, p, mp, N,
                Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, MM: tl.constexpr):
    """``[Q, BP]``: ``Y_i . S[p, :]`` for the chunk's rows (``Y`` = ``B`` or ``C`` rows starting at
    ``y_row``; ``S`` the ``[P, N]`` state starting at ``state``), looped over ``N``."""
    acc = tl.zeros([Q, BP], dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        yv = tl.load(Y_ptr + y_row[:, None] + n[None, :], mask=mt[:, None] & (n < N)[None, :], other=0.0)
        sT = tl.load(S_ptr + state + p[None, :] * N + n[:, None], mask=(n < N)[:, None] & mp[None, :], other=0.0)
        acc += _mm(yv, sT, DOT, MM, False, True)
    return acc


@triton.jit
def ssd_chunk_scan_kernel(
    x_ptr, z_ptr, D_ptr, C_ptr, cb_ptr, states_ptr, delta_ptr, cum_ptr, seg_ptr,
    out_ptr, dy_ptr, dY_ptr, dz_ptr,
    L, H, G, P, N, nc, R,
    HAS_D: tl.constexpr, D_VEC: tl.constexpr, HAS_Z: tl.constexpr, GATE_BWD: tl.constexpr,
    HAS_SEQ: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    DOT: tl.constexpr, MM: tl.constexpr, EMU: tl.constexpr,
):
    """Grid ``(B * nc, H, cdiv(P, BP))``: the chunk's output rows ``[Q, BP]``.

    ``s_i = sum_j CB_ij L_ij delta_j x_j + from_start_i C_i . state_in``, ``y0 = s + D x``,
    ``y = y0 * silu(z)``. With ``GATE_BWD`` (backward recompute) it writes instead
    ``dY = dy * silu(z)`` (float32) and ``dz = dy * y0 * silu'(z)``.
    """
    pid = tl.program_id(0)
    b = (pid // nc).to(tl.int64)
    c = pid % nc
    bc = b * nc + c
    h = tl.program_id(1)
    g = h // R
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    i = tl.arange(0, Q)
    t = c * Q + i
    mt = t < L
    mp = p < P
    delta, cum, cum_last, seg, seg_last, seg_prev = _chunk_vectors(
        delta_ptr, cum_ptr, seg_ptr, b, c, h, L, H, nc, Q, HAS_SEQ)
    decay = _decay_matrix(cum, seg, Q, HAS_SEQ)
    _, from_start, _ = _edge_decays(cum, cum_last, seg, seg_last, seg_prev, HAS_SEQ)
    tok = ((b * L + t) * H + h)[:, None] * P + p[None, :]
    m2 = mt[:, None] & mp[None, :]
    xv = tl.load(x_ptr + tok, mask=m2, other=0.0)
    cb = tl.load(cb_ptr + ((bc * G + g) * Q + i[:, None]) * Q + i[None, :])
    acc = _mm(cb * decay * delta[None, :], xv, DOT, MM, True, False)
    state = ((bc * H + h) * P) * N
    acc += _state_rows(C_ptr, states_ptr, ((b * L + t) * G + g) * N, mt, state, p, mp, N, Q, BP, BN, DOT, MM) \
        * from_start[:, None]
    if HAS_D:
        if D_VEC:
            dsk = tl.load(D_ptr + h).to(tl.float32)
        else:
            dsk = tl.load(D_ptr + h * P + p, mask=mp, other=0.0).to(tl.float32)[None, :]
        acc += dsk * xv.to(tl.float32)
    if GATE_BWD:
        zz = tl.load(z_ptr + tok, mask=m2, other=0.0).to(tl.float32)
        gy = tl.load(dy_ptr + tok, mask=m2, other=0.0).to(tl.float32)
        sig = _sigmoid(zz)
        _store(dz_ptr + tok, gy * acc * sig * (1.0 + zz * (1.0 - sig)), m2, EMU)
        tl.store(dY_ptr + tok, gy * zz * sig, mask=m2)
    else:
        if HAS_Z:
            zz = tl.load(z_ptr + tok, mask=m2, other=0.0).to(tl.float32)
            acc = acc * zz * _sigmoid(zz)
        _store(out_ptr + tok, acc, m2, EMU)


@triton.jit
def _log_decay_grad(zd, cs, off, Q: tl.constexpr):
    """``da_k``, the gradient of the log-decay ``a_k = delta_k A`` (every ``cum_i`` with ``i >= k``
    contains it), from the terms whose exponents span position ``k``:

    ``sum_{i >= k > j} zd[i, j]`` (intra-chunk pairs), ``sum_{j < k} cs_j`` (chunk-state terms, whose
    exponent runs from ``j`` to the chunk end) and ``sum_{i >= k} off_i`` (entering-state terms).
    Written as masked sums, not as a reverse cumulative sum of per-position ``dcum`` terms, in which
    the large undecayed diagonal terms cancel only up to rounding: that loses all precision when
    ``delta * |A|`` is large and the true gradient is tiny.
    """
    r = tl.arange(0, Q)
    zs = tl.where(r[:, None] > r[None, :], zd, 0.0)  # strictly below the diagonal
    before = tl.cumsum(zs, axis=1) - zs  # before[i, k] = sum_{j < k} zs[i, j]
    da = tl.sum(tl.where(r[:, None] >= r[None, :], before, 0.0), axis=0)
    da += tl.sum(tl.where(r[None, :] < r[:, None], cs[None, :], 0.0), axis=1)
    da += tl.sum(tl.where(r[None, :] >= r[:, None], off[None, :], 0.0), axis=1)
    return da


@triton.jit
def ssd_bwd_dx_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, D_ptr, dY_ptr, B_ptr, C_ptr, cb_ptr, sin_ptr, gout_ptr,
    delta_ptr, cum_ptr, seg_ptr,
    dx_ptr, ddt_ptr, dA_ptr, dD_ptr,
    L, H, G, P, N, nc, R,
    HAS_D: tl.constexpr, D_VEC: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DY_F32: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    DOT: tl.constexpr, MM: tl.constexpr, EMU: tl.constexpr,
):
    """Grid ``(B * nc, H)``: per chunk and head, ``dx`` (x dtype), ``ddt`` (float32 ``[B, L, H]``)
    and the partial sums ``dA [B, nc, H]``, ``dD [B, nc, H, P]``.

    ``sin`` holds the state entering each chunk and ``gout`` the gradient of the state leaving it
    (both ``[B, nc, H, P, N]``). With ``M = CB * L``, ``T = dY x^T``, ``Z = M * T``,
    ``v = B gout^T`` and ``o = C sin^T`` (rows ``[Q, P]``):
    ``dx_j = delta_j (M^T dY)_j + delta_j to_end_j v_j + D dY_j``; ``ddelta_j`` collects
    ``sum_i Z_ij``, ``to_end_j x_j . v_j`` and ``A * da_j``, with ``da`` from :func:`_log_decay_grad`
    plus the state-passing decay ``carry * exp(cum_last) <gout, sin>`` (it spans the whole chunk).

    The head dimension is walked in blocks of ``BP`` twice: first for the reductions over ``P``
    (``T``, ``x . v``, ``dY . o``, ``<gout, sin>``), then for ``dx`` (``v`` is recomputed), so no
    tile grows with ``P``.
    """
    pid = tl.program_id(0)
    b = (pid // nc).to(tl.int64)
    c = pid % nc
    bc = b * nc + c
    h = tl.program_id(1)
    g = h // R
    i = tl.arange(0, Q)
    t = c * Q + i
    mt = t < L
    delta, cum, cum_last, seg, seg_last, seg_prev = _chunk_vectors(
        delta_ptr, cum_ptr, seg_ptr, b, c, h, L, H, nc, Q, HAS_SEQ)
    to_end, from_start, carry = _edge_decays(cum, cum_last, seg, seg_last, seg_prev, HAS_SEQ)
    tok_row = ((b * L + t) * H + h) * P
    bc_row = ((b * L + t) * G + g) * N
    state = ((bc * H + h) * P) * N

    # pass 1: reductions over P
    tt = tl.zeros([Q, Q], dtype=tl.float32)
    u = tl.zeros([Q], dtype=tl.float32)  # x_j . v_j
    w_o = tl.zeros([Q], dtype=tl.float32)  # dY_i . o_i
    gs = tl.zeros([BP], dtype=tl.float32)  # <gout, sin> per p
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        mp = p < P
        m2 = mt[:, None] & mp[None, :]
        xv = tl.load(x_ptr + tok_row[:, None] + p[None, :], mask=m2, other=0.0)
        dYv = tl.load(dY_ptr + tok_row[:, None] + p[None, :], mask=m2, other=0.0).to(tl.float32)
        tt += _mm(dYv, tl.trans(xv), DOT, MM, DY_F32, False)
        v = _state_rows(B_ptr, gout_ptr, bc_row, mt, state, p, mp, N, Q, BP, BN, DOT, MM)
        o = _state_rows(C_ptr, sin_ptr, bc_row, mt, state, p, mp, N, Q, BP, BN, DOT, MM)
        u += tl.sum(xv.to(tl.float32) * v, axis=1)
        w_o += tl.sum(dYv * o, axis=1)
        for n0 in range(0, N, BN):
            n = n0 + tl.arange(0, BN)
            soff = state + p[:, None] * N + n[None, :]
            ms = mp[:, None] & (n < N)[None, :]
            gs += tl.sum(tl.load(gout_ptr + soff, mask=ms, other=0.0) * tl.load(sin_ptr + soff, mask=ms, other=0.0),
                         axis=1)
        if HAS_D:
            tl.store(dD_ptr + (bc * H + h) * P + p, tl.sum(dYv * xv.to(tl.float32), axis=0), mask=mp)

    # exponents and step sizes
    cb = tl.load(cb_ptr + ((bc * G + g) * Q + i[:, None]) * Q + i[None, :])
    mix = cb * _decay_matrix(cum, seg, Q, HAS_SEQ)  # M
    zt = mix * tt  # Z
    ddelta = tl.sum(zt, axis=0)
    da = _log_decay_grad(zt * delta[None, :], to_end * delta * u, from_start * w_o, Q)
    da += carry * tl.exp(cum_last) * tl.sum(gs, axis=0)
    ddelta += to_end * u + da * tl.load(A_ptr + h).to(tl.float32)
    tl.store(dA_ptr + bc * H + h, tl.sum(da * delta, axis=0))
    raw = tl.load(dt_ptr + (b * L + t) * H + h, mask=mt, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        ddelta = ddelta * tl.where(raw > SOFTPLUS_THRESHOLD, 1.0, _sigmoid(raw))
    tl.store(ddt_ptr + (b * L + t) * H + h, ddelta, mask=mt)

    # pass 2: dx
    mixT = tl.trans(mix)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        mp = p < P
        m2 = mt[:, None] & mp[None, :]
        dYv = tl.load(dY_ptr + tok_row[:, None] + p[None, :], mask=m2, other=0.0).to(tl.float32)
        v = _state_rows(B_ptr, gout_ptr, bc_row, mt, state, p, mp, N, Q, BP, BN, DOT, MM)
        dx = (_mm(mixT, dYv, DOT, MM, True, DY_F32) + to_end[:, None] * v) * delta[:, None]
        if HAS_D:
            if D_VEC:
                dx += tl.load(D_ptr + h).to(tl.float32) * dYv
            else:
                dx += tl.load(D_ptr + h * P + p, mask=mp, other=0.0).to(tl.float32)[None, :] * dYv
        _store(dx_ptr + tok_row[:, None] + p[None, :], dx, m2, EMU)


@triton.jit
def ssd_bwd_dbc_kernel(
    x_ptr, dY_ptr, B_ptr, C_ptr, sin_ptr, gout_ptr, delta_ptr, cum_ptr, seg_ptr,
    dB_ptr, dC_ptr,
    Bsz, L, H, G, P, N, nc, R, HPS, S,
    DY_F32: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    DOT: tl.constexpr, MM: tl.constexpr,
):
    """Grid ``(B * nc, G * S, cdiv(N, BN))``: partial ``dB, dC`` ``[S, B, L, G, N]`` (float32) of
    the heads ``split * HPS ..`` of group ``g`` (the host sums the ``S`` splits).

    Per head: ``dCB += T * L * delta_j`` (``T = dY x^T``), ``dB_j += delta_j to_end_j gout^T x_j``,
    ``dC_i += from_start_i sin^T dY_i`` (contractions over ``P`` in blocks of ``BP``); then
    ``dB += dCB^T C`` and ``dC += dCB B`` once per group.
    """
    pid = tl.program_id(0)
    b = (pid // nc).to(tl.int64)
    c = pid % nc
    bc = b * nc + c
    g = tl.program_id(1) // S
    split = tl.program_id(1) % S
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    i = tl.arange(0, Q)
    t = c * Q + i
    mt = t < L
    mn = n < N
    mbn = mt[:, None] & mn[None, :]
    dcb = tl.zeros([Q, Q], dtype=tl.float32)
    dB = tl.zeros([Q, BN], dtype=tl.float32)
    dC = tl.zeros([Q, BN], dtype=tl.float32)
    h0 = g * R + split * HPS
    for h in range(h0, tl.minimum(h0 + HPS, g * R + R)):
        delta, cum, cum_last, seg, seg_last, seg_prev = _chunk_vectors(
            delta_ptr, cum_ptr, seg_ptr, b, c, h, L, H, nc, Q, HAS_SEQ)
        to_end, from_start, _ = _edge_decays(cum, cum_last, seg, seg_last, seg_prev, HAS_SEQ)
        tok_row = ((b * L + t) * H + h) * P
        state = ((bc * H + h) * P) * N
        tt = tl.zeros([Q, Q], dtype=tl.float32)
        xg = tl.zeros([Q, BN], dtype=tl.float32)
        ys = tl.zeros([Q, BN], dtype=tl.float32)
        for p0 in range(0, P, BP):
            p = p0 + tl.arange(0, BP)
            mp = p < P
            m2 = mt[:, None] & mp[None, :]
            msn = mp[:, None] & mn[None, :]
            xv = tl.load(x_ptr + tok_row[:, None] + p[None, :], mask=m2, other=0.0)
            dYv = tl.load(dY_ptr + tok_row[:, None] + p[None, :], mask=m2, other=0.0).to(tl.float32)
            tt += _mm(dYv, tl.trans(xv), DOT, MM, DY_F32, False)
            soff = state + p[:, None] * N + n[None, :]
            xg += _mm(xv, tl.load(gout_ptr + soff, mask=msn, other=0.0), DOT, MM, False, True)
            ys += _mm(dYv, tl.load(sin_ptr + soff, mask=msn, other=0.0), DOT, MM, DY_F32, True)
        dcb += tt * _decay_matrix(cum, seg, Q, HAS_SEQ) * delta[None, :]
        dB += xg * (delta * to_end)[:, None]
        dC += ys * from_start[:, None]
    row = ((b * L + t) * G + g)[:, None] * N + n[None, :]
    dB += _mm(tl.trans(dcb), tl.load(C_ptr + row, mask=mbn, other=0.0), DOT, MM, True, False)
    dC += _mm(dcb, tl.load(B_ptr + row, mask=mbn, other=0.0), DOT, MM, True, False)
    out = ((split * Bsz + b) * L + t)[:, None] * G * N + g * N + n[None, :]
    tl.store(dB_ptr + out, dB, mask=mbn)
    tl.store(dC_ptr + out, dC, mask=mbn)
