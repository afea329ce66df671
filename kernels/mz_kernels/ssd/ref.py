"""Sequential reference of the Mamba-2 SSD scan: the oracle, with a hand-written backward.

Shapes (heads ``H`` split into ``G`` groups of ``R = H // G``; head ``h`` reads group ``h // R``):
``x [B, L, H, P]``, ``dt [B, L, H]``, ``A [H]``, ``B, C [B, L, G, N]``, state ``[B, H, P, N]``.

Recurrence per position ``t`` (``delta = softplus(dt + dt_bias)`` or ``dt + dt_bias``)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * x_t (outer) B_t
    y_t = (C_t . h_t + D * x_t) * silu(z_t)

With ``seq_idx`` the carried state is zeroed wherever ``seq_idx`` changes between positions
``t-1`` and ``t``. The forward keeps one ``[B, H, P, N]`` state; the backward keeps
``O(sqrt(L))`` of them (checkpoints every ``ceil(sqrt(L))`` steps, recomputed per segment).
Everything runs in float32, or float64 when ``x`` is float64.
"""
from __future__ import annotations

import math

import torch

from .._oputil import compute_dtype  # noqa: F401  (re-exported for the backends)
import torch.nn.functional as F

# F.softplus switches to the identity above this input (beta = 1); the backward matches it.
SOFTPLUS_THRESHOLD = 20.0



def discretize_dt(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, delta)``: ``raw = dt + dt_bias`` and ``delta = softplus(raw)`` (or ``raw``), in ``dtype``."""
    raw = dt.to(dtype)
    if dt_bias is not None:
        raw = raw + dt_bias.to(dtype)
    delta = F.softplus(raw) if dt_softplus else raw
    return raw, delta


def softplus_grad(raw: torch.Tensor) -> torch.Tensor:
    """Derivative of ``F.softplus`` (default threshold) at ``raw``."""
    return torch.where(raw > SOFTPLUS_THRESHOLD, torch.ones_like(raw), torch.sigmoid(raw))


def reset_mask(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, L]`` bool, True at positions ``t > 0`` where ``seq_idx[:, t] != seq_idx[:, t-1]``."""
    if seq_idx is None:
        return None
    reset = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset


def d_as_matrix(D: torch.Tensor, headdim: int, dtype: torch.dtype) -> torch.Tensor:
    """``D`` of shape ``[H]`` or ``[H, P]`` as ``[H, P]`` (broadcast view) in ``dtype``."""
    D = D.to(dtype)
    return D[:, None].expand(-1, headdim) if D.dim() == 1 else D


def ssd_update(
    state: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step (no D, no gate), all in the state's dtype; functional.

    Args:
        state: ``[B, H, P, N]`` previous state.
        x: ``[B, H, P]``; delta: ``[B, H]`` (already discretised); A: ``[H]``.
        B, C: ``[B, G, N]``.

    Returns:
        ``(new_state [B, H, P, N], C . new_state [B, H, P])``.
    """
    rep = state.shape[1] // B.shape[1]
    Bh = B.repeat_interleave(rep, dim=1)  # [B, H, N]
    Ch = C.repeat_interleave(rep, dim=1)
    decay = torch.exp(delta * A)  # [B, H]
    u = delta[..., None] * x  # [B, H, P]
    new_state = state * decay[..., None, None] + u[..., None] * Bh[:, :, None, :]
    out = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    return new_state, out


def _gate(y0: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    return y0 if z is None else y0 * F.silu(z)


def ssd_ref_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSD scan (inputs already validated).

    Returns:
        ``(y [B, L, H, P] in x.dtype, final_state [B, H, P, N] in the compute dtype)``.
    """
    cdt = compute_dtype(x)
    b, length, h, p = x.shape
    n = B.shape[-1]
    xf = x.to(cdt)
    _, delta = discretize_dt(dt, dt_bias, dt_softplus, cdt)
    Af, Bf, Cf = A.to(cdt), B.to(cdt), C.to(cdt)
    reset = reset_mask(seq_idx)
    state = x.new_zeros((b, h, p, n), dtype=cdt) if initial_state is None else initial_state.to(cdt)
    outs = []
    for t in range(length):
        if reset is not None and t > 0:
            state = torch.where(reset[:, t, None, None, None], 0.0, state)
        state, out = ssd_update(state, xf[:, t], delta[:, t], Af, Bf[:, t], Cf[:, t])
        outs.append(out)
    y = torch.stack(outs, dim=1)
    if D is not None:
        y = y + xf * d_as_matrix(D, p, cdt)
    y = _gate(y, None if z is None else z.to(cdt))
    return y.to(x.dtype), state.clone()


def _grad_like(g: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if like is None else g.to(like.dtype)


def ssd_ref_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Reverse-time backward of :func:`ssd_ref_fwd`.

    Args:
        dy: ``[B, L, H, P]`` cotangent of ``y``; dfinal: ``[B, H, P, N]`` cotangent of the final state.

    Returns:
        Gradients keyed ``x, dt, A, B, C, D, z, dt_bias, initial_state`` (``None`` for absent
        inputs), each in the dtype of its input.
    """
    cdt = compute_dtype(x)
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    xf, dyf = x.to(cdt), dy.to(cdt)
    raw, delta = discretize_dt(dt, dt_bias, dt_softplus, cdt)
    Af, Bf, Cf = A.to(cdt), B.to(cdt), C.to(cdt)
    Dm = None if D is None else d_as_matrix(D, p, cdt)
    zf = None if z is None else z.to(cdt)
    reset = reset_mask(seq_idx)

    def prev_eff(state: torch.Tensor, t: int) -> torch.Tensor:
        if reset is None or t == 0:
            return state
        return torch.where(reset[:, t, None, None, None], 0.0, state)

    # pass 1: checkpoints of the state entering each segment
    seg = max(1, math.isqrt(length - 1) + 1)
    state = x.new_zeros((b, h, p, n), dtype=cdt) if initial_state is None else initial_state.to(cdt)
    checkpoints = []
    for t in range(length):
        if t % seg == 0:
            checkpoints.append(state)
        state, _ = ssd_update(prev_eff(state, t), xf[:, t], delta[:, t], Af, Bf[:, t], Cf[:, t])

    dstate = dfinal.to(cdt)
    dx, ddt, dB, dC, dz = [], [], [], [], []
    dA = torch.zeros_like(Af)
    dD = None if D is None else torch.zeros((h, p), dtype=cdt, device=x.device)
    for start in reversed(range(0, length, seg)):
        stop = min(start + seg, length)
        # pass 2: recompute (prev_eff, state) for every step of this segment
        prevs, states = [], []
        state = checkpoints[start // seg]
        for t in range(start, stop):
            prev = prev_eff(state, t)
            state, _ = ssd_update(prev, xf[:, t], delta[:, t], Af, Bf[:, t], Cf[:, t])
            prevs.append(prev)
            states.append(state)
        for t in reversed(range(start, stop)):
            prev, state = prevs[t - start], states[t - start]
            xt, dlt = xf[:, t], delta[:, t]
            Bh = Bf[:, t].repeat_interleave(rep, dim=1)  # [B, H, N]
            Ch = Cf[:, t].repeat_interleave(rep, dim=1)
            dy0 = dyf[:, t]
            if zf is not None:
                zt = zf[:, t]
                sig = torch.sigmoid(zt)
                y0 = torch.einsum("bhpn,bhn->bhp", state, Ch)
                if Dm is not None:
                    y0 = y0 + Dm * xt
                dz.append(dy0 * y0 * sig * (1 + zt * (1 - sig)))
                dy0 = dy0 * zt * sig
            dxt = torch.zeros_like(xt)
            if Dm is not None:
                dD = dD + (dy0 * xt).sum(0)
                dxt = dy0 * Dm
            dC.append(torch.einsum("bhp,bhpn->bhn", dy0, state).view(b, g, rep, n).sum(2))
            dstate = dstate + dy0[..., None] * Ch[:, :, None, :]
            # state = decay * prev + (delta * x) (outer) B
            decay = torch.exp(dlt * Af)
            du = torch.einsum("bhpn,bhn->bhp", dstate, Bh)
            dxt = dxt + du * dlt[..., None]
            ddelta = (du * xt).sum(-1)
            dB.append(torch.einsum("bhpn,bhp->bhn", dstate, dlt[..., None] * xt).view(b, g, rep, n).sum(2))
            dlog = (dstate * prev).sum((-1, -2)) * decay  # d loss / d (delta * A)
            ddelta = ddelta + dlog * Af
            dA = dA + (dlog * dlt).sum(0)
            dstate = dstate * decay[..., None, None]
            if reset is not None and t > 0:
                dstate = torch.where(reset[:, t, None, None, None], 0.0, dstate)
            if dt_softplus:
                ddelta = ddelta * softplus_grad(raw[:, t])
            dx.append(dxt)
            ddt.append(ddelta)

    ddt_all = torch.stack(ddt[::-1], dim=1)  # [B, L, H]
    grads: dict[str, torch.Tensor | None] = {
        "x": torch.stack(dx[::-1], dim=1).to(x.dtype),
        "dt": ddt_all.to(dt.dtype),
        "A": dA.to(A.dtype),
        "B": torch.stack(dB[::-1], dim=1).to(B.dtype),
        "C": torch.stack(dC[::-1], dim=1).to(C.dtype),
        "D": None,
        "z": None if z is None else torch.stack(dz[::-1], dim=1).to(z.dtype),
        "dt_bias": _grad_like(ddt_all.sum((0, 1)), dt_bias),
        "initial_state": _grad_like(dstate, initial_state),
    }
    if D is not None:
        grads["D"] = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    return grads
