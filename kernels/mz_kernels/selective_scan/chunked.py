"""Chunked selective scan in plain PyTorch: numerically stable, parallel over chunks, any device.

The linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (with ``0 < a_t <= 1``) is solved in two levels:

1. split L into ``nc`` chunks of ``T ~ sqrt(L)`` steps and run the recurrence inside all chunks at once
   from a zero state (T sequential steps on ``[B, nc, d, N]``);
2. carry the chunk-end states across chunks (nc sequential steps on ``[B, d, N]``) and add
   ``cumprod(a) * carry`` inside each chunk.

Only products of decays (each <= 1) appear, never their ratios, so nothing overflows (the
"cumulative-product ratio" form overflows and is deliberately not used). The backward runs the same
two-level scan on the time-reversed adjoint recurrence. Channels are processed in blocks so the
``[B, L, d, N]`` temporaries stay near ``_BLOCK_ELEMS`` elements each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    CKPT,
    cast_grads,
    compute_dtype,
    discretize_dt,
    dt_grad_factor,
    expand_groups,
    gate_grads,
    n_ckpt,
    reduce_groups,
)

_BLOCK_ELEMS = 1 << 22  # elements of one [B, L, d, N] temporary


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``h_t = a_t * h_{t-1} + b_t`` for all t.

    Args:
        a, b: ``[B, L, d, N]`` decays (in (0, 1] for a stable scan) and inputs.
        h0: ``[B, d, N]`` state before t = 0, or None (zeros).

    Returns:
        ``(h [B, L, d, N], h_last [B, d, N])``.
    """
    Bsz, L, d, N = a.shape
    T = max(1, math.isqrt(L - 1) + 1) if L > 1 else 1
    nc = -(-L // T)
    pad = nc * T - L
    if pad:
        a = torch.cat([a, a.new_ones(Bsz, pad, d, N)], 1)
        b = torch.cat([b, b.new_zeros(Bsz, pad, d, N)], 1)
    a = a.reshape(Bsz, nc, T, d, N)
    b = b.reshape(Bsz, nc, T, d, N)
    h = torch.empty_like(b)
    h[:, :, 0] = b[:, :, 0]
    for t in range(1, T):
        torch.addcmul(b[:, :, t], a[:, :, t], h[:, :, t - 1], out=h[:, :, t])
    P = torch.cumprod(a, dim=2)  # decay from each chunk's start to t, <= 1
    carry = torch.empty(Bsz, nc, d, N, dtype=h.dtype, device=h.device)
    S = h.new_zeros(Bsz, d, N) if h0 is None else h0
    for c in range(nc):
        carry[:, c] = S
        S = torch.addcmul(h[:, c, -1], P[:, c, -1], S)
    h.addcmul_(P, carry[:, :, None])
    return h.reshape(Bsz, nc * T, d, N)[:, :L], S


def _blocks(Bsz: int, L: int, Dm: int, G: int, N: int):
    """Channel ranges [d0, d1) of at most ~_BLOCK_ELEMS elements, never crossing a group boundary."""
    per_group = Dm // G
    width = max(1, min(per_group, _BLOCK_ELEMS // max(1, Bsz * L * N)))
    for g0 in range(0, Dm, per_group):
        for d0 in range(g0, g0 + per_group, width):
            yield d0, min(d0 + width, g0 + per_group), g0 // per_group


def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states):
    cd = compute_dtype(u)
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    dt = discretize_dt(delta, delta_bias, delta_softplus, cd)
    uf, Af = u.to(cd), A.to(cd)
    Bf, Cf = B.to(cd), C.to(cd)
    y = torch.empty(Bsz, L, Dm, dtype=cd, device=u.device)
    final = torch.empty(Bsz, Dm, N, dtype=cd, device=u.device)
    saved = torch.empty(Bsz, n_ckpt(L) if save_states else 0, Dm, N, dtype=cd, device=u.device)
    for d0, d1, g in _blocks(Bsz, L, Dm, G, N):
        dtb = dt[:, :, d0:d1, None]
        a = torch.exp(dtb * Af[d0:d1])
        b = (dtb * uf[:, :, d0:d1, None]) * Bf[:, :, g, None, :]
        h0 = None if initial_state is None else initial_state[:, d0:d1].to(cd)
        h, final[:, d0:d1] = linear_scan(a, b, h0)
        y[:, :, d0:d1] = torch.einsum("bldn,bln->bld", h, Cf[:, :, g])
        if save_states:
            saved[:, 0, d0:d1] = 0 if h0 is None else h0
            saved[:, 1:, d0:d1] = h[:, CKPT - 1 : L - 1 : CKPT]
    if D is not None:
        y = y + uf * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), final, saved


def backward(grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    cd = compute_dtype(u)
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    dt = discretize_dt(delta, delta_bias, delta_softplus, cd)
    uf, Af = u.to(cd), A.to(cd)
    Bf, Cf = B.to(cd), C.to(cd)
    Df = None if D is None else D.to(cd)
    y_pre = None
    if z is not None:  # the gate needs y before gating: one extra forward
        y_pre = forward(u.to(cd), delta, A, B, C, D, None, delta_bias, initial_state, delta_softplus, False)[0]
    dy, dz = gate_grads(grad_y.to(cd), y_pre, z) if z is not None else (grad_y.to(cd), None)
    du = torch.empty(Bsz, L, Dm, dtype=cd, device=u.device)
    ddt = torch.empty_like(du)
    dB = torch.zeros(Bsz, L, G, N, dtype=cd, device=u.device)
    dC = torch.zeros_like(dB)
    dA = torch.empty(Dm, N, dtype=cd, device=u.device)
    dinit = None if initial_state is None else torch.empty(Bsz, Dm, N, dtype=cd, device=u.device)
    for d0, d1, g in _blocks(Bsz, L, Dm, G, N):
        dtb = dt[:, :, d0:d1, None]
        ub = uf[:, :, d0:d1, None]
        Bg, Cg = Bf[:, :, g, None, :], Cf[:, :, g, None, :]
        a = torch.exp(dtb * Af[d0:d1])
        h0 = None if initial_state is None else initial_state[:, d0:d1].to(cd)
        h, _ = linear_scan(a, (dtb * ub) * Bg, h0)
        dyb = dy[:, :, d0:d1, None]
        # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, g_{L-1} = C dy + grad_final; solved reversed in time
        a_next = torch.cat([a[:, 1:], a.new_ones(Bsz, 1, d1 - d0, N)], 1)
        gfin = None if grad_final is None else grad_final[:, d0:d1].to(cd)
        gr, _ = linear_scan(a_next.flip(1), (Cg * dyb).flip(1), gfin)
        gs = gr.flip(1)
        dC[:, :, g] += (h * dyb).sum(2)
        h_prev = torch.cat([h.new_zeros(Bsz, 1, d1 - d0, N) if h0 is None else h0[:, None], h[:, :-1]], 1)
        gh = gs * a * h_prev
        gB = gs * Bg
        ddt[:, :, d0:d1] = (gh * Af[d0:d1]).sum(-1) + (gB * ub).sum(-1)
        dA[d0:d1] = (gh * dtb).sum((0, 1))
        du[:, :, d0:d1] = gB.sum(-1) * dt[:, :, d0:d1]
        dB[:, :, g] += (gs * (dtb * ub)).sum(2)
        if dinit is not None:
            dinit[:, d0:d1] = a[:, 0] * gs[:, 0]
    dD = None
    if Df is not None:
        du += Df * dy
        dD = (dy * uf).sum((0, 1))
    sig = dt_grad_factor(delta, delta_bias, delta_softplus, cd)
    ddelta = ddt if sig is None else ddt * sig
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 1))
    return cast_grads(
        (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit),
        (u, delta, A, B, C, D, z, delta_bias, initial_state),
    )
