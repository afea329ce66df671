"""Reference selective scan: a sequential loop over L, the oracle every fast path is tested against.

Working set is ``[B, D, N]``; the ``[B, L, D, N]`` tensor is never built. The backward walks the
checkpoint chunks in reverse, recomputes each chunk's states from its saved start state and runs
the adjoint recurrence ``g_{t-1} = exp(dt_t A) * g_t + C_{t-1} dy_{t-1}`` by hand (so the float64
gradcheck of this file also checks the hand-derived gradients that the fast kernels implement).
"""
from __future__ import annotations

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


def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states):
    cd = compute_dtype(u)
    Bsz, L, Dm = u.shape
    N = A.shape[1]
    dt = discretize_dt(delta, delta_bias, delta_softplus, cd)
    uf = u.to(cd)
    Af = A.to(cd)
    h = torch.zeros(Bsz, Dm, N, dtype=cd, device=u.device) if initial_state is None else initial_state.to(cd).clone()
    y = torch.empty(Bsz, L, Dm, dtype=cd, device=u.device)
    saved = torch.empty(Bsz, n_ckpt(L) if save_states else 0, Dm, N, dtype=cd, device=u.device)
    for t in range(L):
        if save_states and t % CKPT == 0:
            saved[:, t // CKPT] = h
        Bt = expand_groups(B[:, t].to(cd), Dm)
        Ct = expand_groups(C[:, t].to(cd), Dm)
        h = torch.exp(dt[:, t, :, None] * Af) * h + (dt[:, t] * uf[:, t])[:, :, None] * Bt
        y[:, t] = (h * Ct).sum(-1)
    if D is not None:
        y = y + uf * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), h, saved


def backward(grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    cd = compute_dtype(u)
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    if saved.shape[1] == 0:  # forward ran without grad bookkeeping: rebuild the checkpoints
        saved = forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, True)[2]
    dt = discretize_dt(delta, delta_bias, delta_softplus, cd)
    uf, Af = u.to(cd), A.to(cd)
    Df = None if D is None else D.to(cd)
    gy = grad_y.to(cd)
    g = torch.zeros(Bsz, Dm, N, dtype=cd, device=u.device) if grad_final is None else grad_final.to(cd).clone()
    du = torch.empty(Bsz, L, Dm, dtype=cd, device=u.device)
    ddt = torch.empty_like(du)
    dz = None if z is None else torch.empty_like(du)
    dB = torch.empty(Bsz, L, G, N, dtype=cd, device=u.device)
    dC = torch.empty_like(dB)
    dA = torch.zeros(Dm, N, dtype=cd, device=u.device)
    dD = None if D is None else torch.zeros(Dm, dtype=cd, device=u.device)
    for c in reversed(range(saved.shape[1])):
        t0, t1 = c * CKPT, min(L, (c + 1) * CKPT)
        hs = [saved[:, c]]  # hs[i] = state before step t0 + i
        for t in range(t0, t1):
            Bt = expand_groups(B[:, t].to(cd), Dm)
            hs.append(torch.exp(dt[:, t, :, None] * Af) * hs[-1] + (dt[:, t] * uf[:, t])[:, :, None] * Bt)
        for t in reversed(range(t0, t1)):
            h_prev, h_t = hs[t - t0], hs[t - t0 + 1]
            Bt = expand_groups(B[:, t].to(cd), Dm)
            Ct = expand_groups(C[:, t].to(cd), Dm)
            y_pre = (h_t * Ct).sum(-1)
            if Df is not None:
                y_pre = y_pre + Df * uf[:, t]
            dy, dz_t = gate_grads(gy[:, t], y_pre, None if z is None else z[:, t])
            if dz is not None:
                dz[:, t] = dz_t
            g = g + Ct * dy[:, :, None]
            dC[:, t] = reduce_groups(h_t * dy[:, :, None], G)
            decay = torch.exp(dt[:, t, :, None] * Af)
            gh = g * decay * h_prev
            ddt[:, t] = (gh * Af + g * Bt * uf[:, t, :, None]).sum(-1)
            dA += (gh * dt[:, t, :, None]).sum(0)
            du[:, t] = (g * Bt).sum(-1) * dt[:, t]
            dB[:, t] = reduce_groups(g * (dt[:, t] * uf[:, t])[:, :, None], G)
            if Df is not None:
                du[:, t] += Df * dy
                dD += (dy * uf[:, t]).sum(0)
            g = g * decay
    sig = dt_grad_factor(delta, delta_bias, delta_softplus, cd)
    ddelta = ddt if sig is None else ddt * sig
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 1))
    dinit = None if initial_state is None else g
    return cast_grads(
        (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit),
        (u, delta, A, B, C, D, z, delta_bias, initial_state),
    )
