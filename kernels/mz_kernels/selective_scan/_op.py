"""``torch.library`` registration of the selective scan: forward op, backward op, fake kernels and autograd.

The backend name travels as a string argument, so the same two ops serve every backend and a block
built on them traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ._common import compute_dtype, n_ckpt

_MODULES = {"ref": ".ref", "chunked": ".chunked", "cpu": ".cpu", "triton": ".triton"}


def backend_module(name: str):
    return importlib.import_module(_MODULES[name], __package__)


@torch.library.custom_op("mz::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    save_states: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return backend_module(backend).forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states, backend):
    Bsz, L, Dm = u.shape
    N = A.shape[1]
    sd = compute_dtype(u)
    return (
        torch.empty_like(u),
        u.new_empty(Bsz, Dm, N, dtype=sd),
        u.new_empty(Bsz, n_ckpt(L) if save_states else 0, Dm, N, dtype=sd),
    )


@torch.library.custom_op("mz::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    grad_y: Tensor,
    grad_final: Tensor | None,
    saved: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    backend: str,
) -> list[Tensor]:
    grads = backend_module(backend).backward(
        grad_y.contiguous(),
        None if grad_final is None else grad_final.contiguous(),
        saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
    )
    # custom ops cannot return None: absent inputs get an empty placeholder, dropped again in _backward
    return [u.new_empty(0) if g is None else g for g in grads]


@selective_scan_bwd.register_fake
def _(grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, backend):
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [u.new_empty(0) if x is None else torch.empty_like(x) for x in ins]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend


def _backward(ctx, grad_y, grad_final, _grad_saved):
    u, delta, A, B, C, D, z, delta_bias, initial_state, saved = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    grads = selective_scan_bwd(
        grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, ctx.delta_softplus, ctx.backend
    )
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    out = [None if x is None else g for g, x in zip(grads, ins)]
    return (*out, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)
