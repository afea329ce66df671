"""Pieces every selective-scan backend shares: the backend contract, dtypes and checkpoint spacing.

Backend contract (each backend module exposes these two functions):

``forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states)``
    -> ``(y [B, L, D] in u.dtype, final_state [B, D, N], saved [B, n_ckpt, D, N])``

    ``saved`` holds the state *before* positions 0, CKPT, 2*CKPT, ... (``n_ckpt = ceil(L / CKPT)``)
    when ``save_states`` is true, else it is an empty ``[B, 0, D, N]`` tensor.

``backward(grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)``
    -> ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``, each in the dtype of its
    input (``None`` where the input is ``None``).

All inputs reach a backend contiguous and validated. Compute, state and exponentials are float32
(float64 when ``u`` is float64, for gradcheck).
"""
from __future__ import annotations

import math

import torch

from .._oputil import compute_dtype  # noqa: F401  (re-exported for the backends)
import torch.nn.functional as F

CKPT = 64  # spacing of the saved chunk-start states used by every backend's backward


def n_ckpt(L: int) -> int:
    return math.ceil(L / CKPT)



def discretize_dt(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``softplus(delta + delta_bias)`` (or without softplus) in ``dtype``; ``[B, L, D]``."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    return F.softplus(dt) if softplus else dt


def dt_grad_factor(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool, dtype: torch.dtype):
    """d dt / d delta: ``sigmoid(delta + bias)`` with softplus, else ``None`` (identity)."""
    if not softplus:
        return None
    x = delta.to(dtype)
    if delta_bias is not None:
        x = x + delta_bias.to(dtype)
    return torch.sigmoid(x)


def expand_groups(x: torch.Tensor, D: int) -> torch.Tensor:
    """``[..., G, N]`` -> ``[..., D, N]``: channel d reads group ``d // (D // G)``."""
    G = x.shape[-2]
    return x.repeat_interleave(D // G, dim=-2) if G != D else x


def reduce_groups(x: torch.Tensor, G: int) -> torch.Tensor:
    """Adjoint of :func:`expand_groups`: ``[..., D, N]`` -> ``[..., G, N]`` (sum over the group's channels)."""
    *lead, D, N = x.shape
    return x.reshape(*lead, G, D // G, N).sum(-2)


def gate_grads(gy: torch.Tensor, y_pre: torch.Tensor, z: torch.Tensor | None):
    """For ``out = y_pre * silu(z)``: returns ``(d y_pre, dz or None)`` in y_pre's dtype."""
    if z is None:
        return gy, None
    zf = z.to(y_pre.dtype)
    sig = torch.sigmoid(zf)
    silu = zf * sig
    dz = gy * y_pre * (sig * (1 + zf * (1 - sig)))
    return gy * silu, dz


def cast_grads(grads, inputs):
    """Cast each gradient to its input's dtype; ``None`` where the input is ``None``."""
    return tuple(None if (g is None or x is None) else g.to(x.dtype) for g, x in zip(grads, inputs))
