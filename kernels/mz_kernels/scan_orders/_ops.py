"""``torch.library`` registration of the two token movers every scan order is built from.

``mz::gather_tokens`` reads tokens of a grid into K scan orders; ``mz::scatter_tokens`` writes them
back and sums over the K directions. They are adjoint to each other, so each one's backward is the
other one. Both take the order as an ``index`` [K, L'] and its ``inverse`` [K, L]:

- ``index[k, j]`` is the grid token read at scan position ``j`` of direction ``k``; ``-1`` marks a
  padded slot, which reads zero;
- ``inverse[k, i]`` is the scan position of grid token ``i`` in direction ``k``; ``-1`` when
  direction ``k`` does not visit token ``i``.

Each direction visits a token at most once, so the scatter is itself a gather (deterministic, no
atomics). ``index_holes`` / ``inverse_holes`` say whether any ``-1`` is present; they are known when
the order is built, and skip a masking pass when ``False``.

Implementations (:func:`token_backend` picks one per call; the environment variable
``MZ_SCAN_ORDER_BACKEND`` is read on every call):

- ``"auto"`` (default): the Triton kernels of ``triton.py`` for CUDA tensors when triton is
  installed, else the torch indexing below;
- ``"torch"``: always the torch indexing;
- ``"triton"``: always the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1`` (the
  interpreter, for tests).

Dtypes other than float32/float16/bfloat16 (float64 for gradcheck, integers) and empty tensors
always take the torch path. Both paths give the same gathers bit for bit; the Triton merge adds in
float32 and rounds once to the input dtype.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from .._backend import triton_interpreted

BACKEND_ENV = "MZ_SCAN_ORDER_BACKEND"
TOKEN_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def token_backend(t: Tensor) -> str:
    """``"torch"`` or ``"triton"``: the implementation the movers use for tokens ``t`` (see above)."""
    name = os.environ.get(BACKEND_ENV, "").strip() or "auto"
    if name not in TOKEN_BACKENDS:
        raise ValueError(f"scan orders: environment variable {BACKEND_ENV} must be one of {list(TOKEN_BACKENDS)}, "
                         f"got {name!r}")
    if name == "torch" or t.dtype not in _TRITON_DTYPES or t.numel() == 0:
        return "torch"
    if name == "auto":
        return "triton" if t.is_cuda and _triton_installed() else "torch"
    if not _triton_installed():
        raise ValueError(f"scan orders: {BACKEND_ENV}=triton needs the triton package, which is not installed")
    if not t.is_cuda and not triton_interpreted():
        raise ValueError(f"scan orders: {BACKEND_ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got tensors on {t.device}")
    return "triton"


def _gather(x: Tensor, index: Tensor, holes: bool) -> Tensor:
    """``out[b, j, k, c] = x[b, index[k, j], c]`` (zero where ``index == -1``)."""
    B, _, C = x.shape
    K, Lp = index.shape
    flat = index.t().reshape(-1)  # [L' * K], position j * K + k
    out = x.new_empty(B, Lp, K, C)
    torch.index_select(x, 1, flat.clamp(min=0) if holes else flat, out=out.view(B, Lp * K, C))
    if holes:
        out.masked_fill_((index.t() < 0).view(1, Lp, K, 1), 0)
    return out


def _scatter(y: Tensor, inverse: Tensor, holes: bool) -> Tensor:
    """``out[b, i, c] = sum_k y[b, inverse[k, i], k, c]`` (terms with ``inverse == -1`` are zero)."""
    B, Lp, K, C = y.shape
    L = inverse.shape[1]
    if K == 1 and not holes:
        out = y.new_empty(B, L, C)
        torch.index_select(y.reshape(B, Lp, C), 1, inverse[0], out=out)
        return out
    k = torch.arange(K, device=inverse.device, dtype=inverse.dtype)
    flat = (inverse * K + k[:, None]).t().reshape(-1)  # [L * K] into y viewed as [B, L' * K, C]; < 0 on holes
    parts = y.reshape(B, Lp * K, C).index_select(1, flat.clamp(min=0) if holes else flat).view(B, L, K, C)
    if holes:
        parts.masked_fill_((inverse.t() < 0).view(1, L, K, 1), 0)
    return parts.sum(dim=2)


@torch.library.custom_op("mz::gather_tokens", mutates_args=())
def gather_tokens_op(x: Tensor, index: Tensor, inverse: Tensor, index_holes: bool, inverse_holes: bool) -> Tensor:
    """x [B, L, C] -> [B, L', K, C] following ``index`` [K, L']."""
    if token_backend(x) == "triton":
        from . import triton as triton_kernels

        return triton_kernels.gather(x, index, inverse, index_holes, inverse_holes)
    return _gather(x, index, index_holes)


@gather_tokens_op.register_fake
def _(x, index, inverse, index_holes, inverse_holes):
    return x.new_empty(x.shape[0], index.shape[1], index.shape[0], x.shape[2])


@torch.library.custom_op("mz::scatter_tokens", mutates_args=())
def scatter_tokens_op(y: Tensor, index: Tensor, inverse: Tensor, index_holes: bool, inverse_holes: bool) -> Tensor:
    """y [B, L', K, C] -> [B, L, C]: un-permute each direction and sum over K."""
    if token_backend(y) == "triton":
        from . import triton as triton_kernels

        return triton_kernels.scatter(y, index, inverse, index_holes, inverse_holes)
    return _scatter(y, inverse, inverse_holes)


@scatter_tokens_op.register_fake
def _(y, index, inverse, index_holes, inverse_holes):
    return y.new_empty(y.shape[0], inverse.shape[1], y.shape[3])


def _setup_context(ctx, inputs, output):
    _, index, inverse, index_holes, inverse_holes = inputs
    ctx.save_for_backward(index, inverse)
    ctx.holes = (index_holes, inverse_holes)


def _gather_backward(ctx, grad):
    index, inverse = ctx.saved_tensors
    return scatter_tokens_op(grad, index, inverse, *ctx.holes), None, None, None, None


def _scatter_backward(ctx, grad):
    index, inverse = ctx.saved_tensors
    return gather_tokens_op(grad, index, inverse, *ctx.holes), None, None, None, None


gather_tokens_op.register_autograd(_gather_backward, setup_context=_setup_context)
scatter_tokens_op.register_autograd(_scatter_backward, setup_context=_setup_context)
