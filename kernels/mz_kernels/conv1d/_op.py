"""``torch.library`` registration of the causal conv1d: ``mz::causal_conv1d_fwd`` / ``mz::causal_conv1d_bwd``.

The forward always returns the final state; the backward op returns every gradient, with an
empty tensor standing for an absent optional input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._oputil import fresh

from .ref import compute_dtype, conv1d_ref_bwd, conv1d_ref_fwd

GRAD_NAMES = ("x", "weight", "bias", "initial_state")
BACKENDS = ("ref", "cpu", "triton")


def _impl(backend: str, direction: str):
    """The ``fwd``/``bwd`` function of ``backend`` (triton is imported only when it runs)."""
    if backend == "ref":
        return conv1d_ref_fwd if direction == "fwd" else conv1d_ref_bwd
    if backend == "cpu":
        from .cpu import conv1d_cpu_bwd, conv1d_cpu_fwd

        return conv1d_cpu_fwd if direction == "fwd" else conv1d_cpu_bwd
    if backend == "triton":
        from .triton import conv1d_triton_bwd, conv1d_triton_fwd

        return conv1d_triton_fwd if direction == "fwd" else conv1d_triton_bwd
    raise ValueError(f"causal_conv1d: backend must be one of {list(BACKENDS)}, got {backend!r}")



@torch.library.custom_op("mz::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, activation: str | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(y [B, L, D], final_state [B, D, W-1])``; inputs validated by ``causal_conv1d``."""
    y, final = _impl(backend, "fwd")(x, weight, bias, activation, initial_state)
    return fresh(y, x), fresh(final, x, *(() if initial_state is None else (initial_state,)))


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, activation, backend):
    b, _, d = x.shape
    return torch.empty_like(x), x.new_empty((b, d, weight.shape[1] - 1), dtype=compute_dtype(x))


@torch.library.custom_op("mz::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    dy: Tensor, dfinal: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
    initial_state: Tensor | None, activation: str | None, backend: str,
) -> list[Tensor]:
    """Gradients ``[dx, dweight, dbias, dinitial_state]`` (empty where the input is absent)."""
    grads = _impl(backend, "bwd")(dy, dfinal, x, weight, bias, activation, initial_state)
    return [x.new_empty(0) if grads[k] is None else fresh(grads[k], dy, dfinal) for k in GRAD_NAMES]


@causal_conv1d_bwd.register_fake
def _(dy, dfinal, x, weight, bias, initial_state, activation, backend):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in (x, weight, bias, initial_state)]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, initial_state, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.config = (activation, backend)


def _backward(ctx, dy: Tensor | None, dfinal: Tensor | None):
    x, weight, bias, initial_state = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dfinal is None:
        dfinal = x.new_zeros((x.shape[0], x.shape[2], weight.shape[1] - 1), dtype=compute_dtype(x))
    grads = torch.ops.mz.causal_conv1d_bwd(dy, dfinal, x, weight, bias, initial_state, *ctx.config)
    present = (x, weight, bias, initial_state)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None, None)


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)
