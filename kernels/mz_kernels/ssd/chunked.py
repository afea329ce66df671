"""Chunked SSD scan: the stable Mamba-2 block decomposition in plain PyTorch, with its backward.

The sequence is cut into chunks of ``Q`` positions. With ``a_t = delta_t * A`` (log-decays, ``<= 0``
for ``A <= 0``) and ``S[i, j] = a_{j+1} + ... + a_i`` (``-inf`` above the diagonal):

1. intra-chunk output   ``Y_diag[i] = sum_j (C_i . B_j) exp(S[i, j]) delta_j x_j``
2. chunk states         ``H_c = sum_j exp(S[Q-1, j]) delta_j x_j (outer) B_j``
3. state passing        ``h_c = exp(a_0 + ... + a_{Q-1}) h_{c-1} + H_c`` (sequential over chunks)
4. inter-chunk output   ``Y_off[i] = exp(a_0 + ... + a_i) C_i . h_{c-1}``

``S`` is a masked cumulative sum inside one chunk, so every exponent is a plain sum of
log-decays: nothing is a difference of cumulative sums and no ratio of products is formed,
hence nothing overflows for any ``delta * |A|``. A ``seq_idx`` boundary at position ``t`` sets
``a_t = -inf`` (the decay into ``t`` is zero), which is exactly a state reset.

``ssd_chunked`` is differentiable by autograd; ``ssd_chunked_bwd`` is the same backward written
out by hand (used by the custom op, which cannot record autograd inside its implementation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ref import compute_dtype, d_as_matrix, discretize_dt, reset_mask, softplus_grad


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``[..., Q]`` log-decays -> ``[..., Q, Q]`` with ``out[i, j] = a[j+1] + ... + a[i]`` for ``i >= j``
    (0 on the diagonal) and ``-inf`` above it, by a masked cumulative sum (no differences)."""
    q = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, q)  # rep[i, j] = a[i]
    below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    out = rep.masked_fill(~below, 0.0).cumsum(dim=-2)
    keep = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


def segsum_bwd(dseg: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`segsum` on its finite (lower) part: ``da[k] = sum_{i >= k} sum_{j < k} dseg[i, j]``."""
    q = dseg.shape[-1]
    before = F.pad(dseg.cumsum(dim=-1)[..., :-1], (1, 0))  # before[i, k] = sum_{j < k} dseg[i, j]
    keep = torch.ones(q, q, dtype=torch.bool, device=dseg.device).tril(0)
    return before.masked_fill(~keep, 0.0).sum(dim=-2)


def _to_chunks(t: torch.Tensor, nc: int, q: int) -> torch.Tensor:
    """``[B, L, ...]`` -> zero-padded ``[B, nc, Q, ...]``."""
    pad = nc * q - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], nc, q, *t.shape[2:])


def _from_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, nc, Q, ...]`` -> ``[B, L, ...]`` (drops the padding)."""
    return t.reshape(t.shape[0], -1, *t.shape[3:])[:, :length]


@dataclass
class _Parts:
    """Chunked intermediates (``R = H // G`` heads per group, ``nc`` chunks of ``Q``)."""

    xf: torch.Tensor  # [B, L, H, P]
    raw: torch.Tensor  # [B, L, H]  dt + dt_bias
    delta: torch.Tensor  # [B, L, H]
    xd: torch.Tensor  # [B, nc, Q, G, R, P]  delta * x
    Bc: torch.Tensor  # [B, nc, Q, G, N]
    Cc: torch.Tensor  # [B, nc, Q, G, N]
    decay_in: torch.Tensor  # [B, G, R, nc, Q, Q]  exp(S)
    cb: torch.Tensor  # [B, G, nc, Q, Q]  C_i . B_j
    to_end: torch.Tensor  # [B, nc, Q, G, R, 1]  exp(S[Q-1, j])
    from_start: torch.Tensor  # [B, nc, Q, G, R, 1]  exp(a_0 + ... + a_i)
    chunk_decay: torch.Tensor  # [B, G, R, nc]
    entering: torch.Tensor  # [B, nc, G, R, P, N]  state entering each chunk
    final: torch.Tensor  # [B, G, R, P, N]
    s: torch.Tensor  # [B, L, H, P]  C . state (before D and the gate)


def _forward_parts(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> _Parts:
    cdt = compute_dtype(x)
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    q = min(chunk_size, length)
    nc = -(-length // q)

    xf = x.to(cdt)
    raw, delta = discretize_dt(dt, dt_bias, dt_softplus, cdt)  # [B, L, H]
    loga = delta * A.to(cdt)
    reset = reset_mask(seq_idx)
    if reset is not None:
        loga = loga.masked_fill(reset[..., None], float("-inf"))
    xd = _to_chunks(xf * delta[..., None], nc, q).reshape(b, nc, q, g, r, p)
    Bc = _to_chunks(B.to(cdt), nc, q)
    Cc = _to_chunks(C.to(cdt), nc, q)
    loga = _to_chunks(loga, nc, q).reshape(b, nc, q, g, r).permute(0, 3, 4, 1, 2)  # [B, G, R, nc, Q]

    seg = segsum(loga)
    cum = loga.cumsum(dim=-1)  # a_0 + ... + a_i
    decay_in = torch.exp(seg)
    # 1. intra-chunk (diagonal blocks)
    cb = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)
    y_diag = torch.einsum("bgrcij,bcjgrp->bcigrp", cb[:, :, None] * decay_in, xd)
    # 2. per-chunk states, decayed to the chunk end
    to_end = decay_in[..., -1, :].permute(0, 3, 4, 1, 2)[..., None]
    states = torch.einsum("bcjgn,bcjgrp->bcgrpn", Bc, xd * to_end)
    # 3. sequential state passing across chunks
    chunk_decay = torch.exp(cum[..., -1])
    if initial_state is None:
        state = xf.new_zeros((b, g, r, p, n))
    else:
        state = initial_state.to(cdt).reshape(b, g, r, p, n)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[..., c, None, None] * state + states[:, c]
    entering_t = torch.stack(entering, dim=1)
    # 4. contribution of the state entering each chunk
    from_start = torch.exp(cum).permute(0, 3, 4, 1, 2)[..., None]
    y_off = torch.einsum("bcign,bcgrpn->bcigrp", Cc, entering_t) * from_start
    s = _from_chunks((y_diag + y_off).reshape(b, nc, q, h, p), length)
    return _Parts(xf, raw, delta, xd, Bc, Cc, decay_in, cb, to_end, from_start, chunk_decay,
                  entering_t, state, s)


def ssd_chunked(
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
    """Chunked SSD scan (inputs already validated); same contract as ``ssd_ref_fwd``.

    Temporaries are ``[B, H, L, Q]`` (the intra-chunk decay matrix) and ``[B, L/Q, H, P, N]``
    (chunk states). ``L`` is zero-padded up to a multiple of ``Q = min(chunk_size, L)``; padded
    steps have ``delta = 0`` (decay 1, no input), so they leave the state unchanged.

    Returns:
        ``(y [B, L, H, P] in x.dtype, final_state [B, H, P, N] in the compute dtype)``.
    """
    parts = _forward_parts(x, dt, A, B, C, chunk_size, dt_bias, dt_softplus, initial_state, seq_idx)
    b, _, h, p = x.shape
    y = parts.s
    if D is not None:
        y = y + parts.xf * d_as_matrix(D, p, y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(x.dtype), parts.final.reshape(b, h, p, -1)


def ssd_chunked_bwd(
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
) -> dict[str, torch.Tensor | None]:
    """Backward of :func:`ssd_chunked` (recomputes the forward intermediates).

    Args:
        dy: ``[B, L, H, P]`` cotangent of ``y``; dfinal: ``[B, H, P, N]`` cotangent of the final state.

    Returns:
        Gradients keyed ``x, dt, A, B, C, D, z, dt_bias, initial_state`` (``None`` for absent
        inputs), each in the dtype of its input.
    """
    with torch.no_grad():
        pt = _forward_parts(x, dt, A, B, C, chunk_size, dt_bias, dt_softplus, initial_state, seq_idx)
        return _chunked_bwd(pt, dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)


def _chunked_bwd(pt, dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state):
    cdt = pt.xf.dtype
    b, length, h, p = x.shape
    _, nc, q, g, r, _ = pt.xd.shape
    n = B.shape[-1]
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(("D", "z", "dt_bias", "initial_state"))

    # gate and skip: y = (s + D x) * silu(z)
    ds = dy.to(cdt)
    Dm = None if D is None else d_as_matrix(D, p, cdt)
    if z is not None:
        zf = z.to(cdt)
        sig = torch.sigmoid(zf)
        y0 = pt.s if Dm is None else pt.s + pt.xf * Dm
        grads["z"] = (ds * y0 * sig * (1 + zf * (1 - sig))).to(z.dtype)
        ds = ds * zf * sig
    dxf = torch.zeros_like(pt.xf)
    if Dm is not None:
        dD = (ds * pt.xf).sum((0, 1))
        grads["D"] = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
        dxf = ds * Dm
    dY = _to_chunks(ds, nc, q).reshape(b, nc, q, g, r, p)

    # 4. y_off = (C . entering) * from_start
    yo_raw = torch.einsum("bcign,bcgrpn->bcigrp", pt.Cc, pt.entering)
    dcum = ((dY * yo_raw).sum(-1, keepdim=True) * pt.from_start)[..., 0].permute(0, 3, 4, 1, 2)  # [B,G,R,nc,Q]
    dyo = dY * pt.from_start
    dCc = torch.einsum("bcigrp,bcgrpn->bcign", dyo, pt.entering)
    dentering = torch.einsum("bcigrp,bcign->bcgrpn", dyo, pt.Cc)
    # 3. state passing, in reverse
    gstate = dfinal.to(cdt).reshape(b, g, r, p, n)
    dstates, dchunk = [None] * nc, [None] * nc
    for c in reversed(range(nc)):
        dstates[c] = gstate
        dchunk[c] = (gstate * pt.entering[:, c]).sum((-1, -2))
        gstate = pt.chunk_decay[..., c, None, None] * gstate + dentering[:, c]
    if initial_state is not None:
        grads["initial_state"] = gstate.reshape(b, h, p, n).to(initial_state.dtype)
    dcum = dcum.clone()
    dcum[..., -1] += torch.stack(dchunk, dim=-1) * pt.chunk_decay
    dstates_t = torch.stack(dstates, dim=1)  # [B, nc, G, R, P, N]
    # 2. states = B . (xd * to_end)
    xw = pt.xd * pt.to_end
    dBc = torch.einsum("bcgrpn,bcjgrp->bcjgn", dstates_t, xw)
    dxw = torch.einsum("bcgrpn,bcjgn->bcjgrp", dstates_t, pt.Bc)
    dxd = dxw * pt.to_end
    dto_end = ((dxw * pt.xd).sum(-1, keepdim=True) * pt.to_end)[..., 0].permute(0, 3, 4, 1, 2)
    # 1. y_diag = (cb * decay_in) . xd
    dmix = torch.einsum("bcigrp,bcjgrp->bgrcij", dY, pt.xd)
    dxd = dxd + torch.einsum("bgrcij,bcigrp->bcjgrp", pt.cb[:, :, None] * pt.decay_in, dY)
    dcb = (dmix * pt.decay_in).sum(2)
    dseg = dmix * pt.cb[:, :, None] * pt.decay_in
    dseg[..., -1, :] += dto_end
    dCc = dCc + torch.einsum("bgcij,bcjgn->bcign", dcb, pt.Bc)
    dBc = dBc + torch.einsum("bgcij,bcign->bcjgn", dcb, pt.Cc)
    dloga = segsum_bwd(dseg) + dcum.flip(-1).cumsum(-1).flip(-1)

    # back to [B, L, ...] and through loga = delta * A, xd = delta * x, delta = softplus(raw)
    # (at a seq_idx reset loga = -inf and every term of dloga carries exp(-inf) = 0)
    dloga = _from_chunks(dloga.permute(0, 3, 4, 1, 2).reshape(b, nc, q, h), length)
    dxd = _from_chunks(dxd.reshape(b, nc, q, h, p), length)
    dxf = dxf + dxd * pt.delta[..., None]
    Af = A.to(cdt)
    ddelta = (dxd * pt.xf).sum(-1) + dloga * Af
    dA = (dloga * pt.delta).sum((0, 1))
    draw = ddelta * softplus_grad(pt.raw) if dt_softplus else ddelta
    grads.update(
        x=dxf.to(x.dtype),
        dt=draw.to(dt.dtype),
        A=dA.to(A.dtype),
        B=_from_chunks(dBc, length).to(B.dtype),
        C=_from_chunks(dCc, length).to(C.dtype),
    )
    if dt_bias is not None:
        grads["dt_bias"] = draw.sum((0, 1)).to(dt_bias.dtype)
    return grads
