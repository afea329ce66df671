"""One step of the selective scan for streaming inference (EEG, audio, tracking): O(B*D*N) per call."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import STATE_DTYPES, check_same_device, check_tensor
from ._common import compute_dtype, discretize_dt, expand_groups

_OP = "selective_scan_step"


def selective_scan_step(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
) -> tuple[Tensor, Tensor]:
    """Advance the scan by one position; functional (``state`` is not modified).

    Args:
        state: ``[B, D, N]`` float32 state after the previous position (zeros at the start).
        u, delta, z: ``[B, D]`` inputs of this position.
        A: ``[D, N]``; B, C: ``[B, G, N]``; D, delta_bias: ``[D]``.

    Returns:
        ``(y [B, D] in u.dtype, new_state [B, D, N] float32)``; feeding positions 0..L-1 one by one
        gives the same outputs and final state as :func:`selective_scan` on the whole sequence.
    """
    check_tensor(_OP, "state", state, dims="B D N", dtypes=STATE_DTYPES, contiguous=False)
    Bsz, Dm, N = state.shape
    check_tensor(_OP, "u", u, dims="B D", shape=(Bsz, Dm), contiguous=False)
    check_tensor(_OP, "delta", delta, dims="B D", shape=(Bsz, Dm), dtypes=(u.dtype,), contiguous=False)
    check_tensor(_OP, "A", A, dims="D N", shape=(Dm, N), dtypes=STATE_DTYPES, contiguous=False)
    check_tensor(_OP, "B", B, dims="B G N", shape=(Bsz, None, N), contiguous=False)
    G = B.shape[1]
    if Dm % G:
        raise ValueError(f"{_OP}: D = {Dm} channels must be divisible by the number of groups G = {G} (B.shape[1])")
    check_tensor(_OP, "C", C, dims="B G N", shape=(Bsz, G, N), dtypes=(B.dtype,), contiguous=False)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(_OP, name, t, dims="D", shape=(Dm,), dtypes=STATE_DTYPES, contiguous=False)
    if z is not None:
        check_tensor(_OP, "z", z, dims="B D", shape=(Bsz, Dm), dtypes=(u.dtype,), contiguous=False)
    check_same_device(_OP, state=state, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    cd = compute_dtype(u)
    dt = discretize_dt(delta, delta_bias, delta_softplus, cd)
    uf = u.to(cd)
    new_state = torch.exp(dt[..., None] * A.to(cd)) * state.to(cd) + (dt * uf)[..., None] * expand_groups(B.to(cd), Dm)
    y = (new_state * expand_groups(C.to(cd), Dm)).sum(-1)
    if D is not None:
        y = y + D.to(cd) * uf
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), new_state
