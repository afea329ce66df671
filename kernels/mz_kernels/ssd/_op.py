"""``torch.library`` registration of the SSD scan: ``mz::ssd_scan_fwd`` / ``mz::ssd_scan_bwd``.

Being custom ops, both are opaque to ``torch.compile`` (``fullgraph=True`` works) and export.
The forward always returns the final state; the backward op returns every gradient, with an
empty tensor standing for an absent optional input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._oputil import fresh

from .chunked import ssd_chunked, ssd_chunked_bwd
from .ref import compute_dtype, ssd_ref_bwd, ssd_ref_fwd

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _run_fwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    dt_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None,
    chunk_size: int, dt_softplus: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state, seq_idx=seq_idx)
    if backend == "ref":
        return ssd_ref_fwd(x, dt, A, B, C, **kw)
    if backend == "chunked":
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    if backend == "triton":
        from .triton import ssd_triton_fwd  # lazy: triton is imported only when this backend runs

        return ssd_triton_fwd(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    raise ValueError(f"ssd_scan: backend must be one of ['ref', 'chunked', 'triton'], got {backend!r}")


@torch.library.custom_op("mz::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    dt_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None,
    chunk_size: int, dt_softplus: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """``(y [B, L, H, P], final_state [B, H, P, N])``; inputs validated by ``ssd_scan``."""
    return _run_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size, dt_softplus, backend)


@ssd_scan_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size, dt_softplus, backend):
    b, _, h, p = x.shape
    return torch.empty_like(x), x.new_empty((b, h, p, B.shape[-1]), dtype=compute_dtype(x))



@torch.library.custom_op("mz::ssd_scan_bwd", mutates_args=())
def ssd_scan_bwd(
    dy: Tensor, dfinal: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
    z: Tensor | None, dt_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None,
    chunk_size: int, dt_softplus: bool, backend: str,
) -> list[Tensor]:
    """Gradients ``[dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state]`` (empty where the input is absent).

    ``ref`` runs the reverse-time loop, ``chunked`` the block backward, ``triton`` its kernels (all
    written by hand: a custom op's implementation runs below autograd, so it cannot differentiate a
    recomputed forward).
    """
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state, seq_idx=seq_idx)
    if backend == "ref":
        grads = ssd_ref_bwd(dy, dfinal, x, dt, A, B, C, **kw)
    elif backend == "chunked":
        grads = ssd_chunked_bwd(dy, dfinal, x, dt, A, B, C, chunk_size=chunk_size, **kw)
    elif backend == "triton":
        from .triton import ssd_triton_bwd

        grads = ssd_triton_bwd(dy, dfinal, x, dt, A, B, C, chunk_size=chunk_size, **kw)
    else:
        raise ValueError(f"ssd_scan: backend must be one of ['ref', 'chunked', 'triton'], got {backend!r}")
    return [x.new_empty(0) if grads[k] is None else fresh(grads[k], dy, dfinal) for k in GRAD_NAMES]


@ssd_scan_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size, dt_softplus, backend):
    like = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in like]


def _setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size, dt_softplus, backend = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    ctx.config = (chunk_size, dt_softplus, backend)


def _backward(ctx, dy: Tensor | None, dfinal: Tensor | None):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dfinal is None:
        dfinal = x.new_zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), dtype=compute_dtype(x))
    grads = torch.ops.mz.ssd_scan_bwd(
        dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, *ctx.config
    )
    present = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None, None, None, None)


ssd_scan_fwd.register_autograd(_backward, setup_context=_setup_context)
