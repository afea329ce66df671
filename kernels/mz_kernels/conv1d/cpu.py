"""``cpu`` backend of the causal conv1d: a C kernel (``csrc/conv1d_cpu.c``) compiled on first use.

Same contract as :mod:`.ref` (``conv1d_cpu_fwd`` / ``conv1d_cpu_bwd``): inputs are converted to
contiguous float32 for the C call and results cast back; float64 goes to the reference. Work units
are (batch row, block of 256 steps), vectorised over channels; ``dweight``/``dbias`` are summed from
per-unit partials in a fixed order (results independent of the thread count). Fuses the bias, the
SiLU and the state handling that the reference does as separate PyTorch ops over ``[B, L, D]``.
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .._cbuild import CBuildError, load_library
from . import ref

_SOURCE = Path(__file__).with_name("csrc") / "conv1d_cpu.c"
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "mz_conv1d_has_openmp": ([], ctypes.c_int),
    "mz_conv1d_units": ([_I, _I], _I),
    "mz_conv1d_fwd": ([_P] * 6 + [_I] * 4 + [ctypes.c_int, _I, _I, ctypes.c_int], ctypes.c_int),
    "mz_conv1d_bwd": ([_P] * 10 + [_I] * 4 + [ctypes.c_int, _I, _I, ctypes.c_int], ctypes.c_int),
}
_GRAIN = 1 << 15  # output elements per thread below which fewer threads are used

_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The compiled library (built and cached on first use). Raises :class:`CBuildError`."""
    global _lib
    if _lib is None:  # a module global: no path resolution or lock on the per-call path
        _lib = load_library(_SOURCE, _SIGNATURES)
    return _lib


def probe() -> str | None:
    """``None`` when the kernel builds and loads here, else a one-line reason (warned once)."""
    try:
        library()
    except CBuildError as e:
        warnings.warn(f"mz_kernels: causal_conv1d backend 'cpu' is unavailable ({e}); 'auto' uses 'ref'", RuntimeWarning, stacklevel=2)
        return str(e)
    return None


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(work: int, units: int) -> int:
    return max(1, min(torch.get_num_threads(), units, work // _GRAIN))


def _run(fn, args: list, units: int, threads: int) -> None:
    lib = library()
    if not lib.mz_conv1d_has_openmp() and threads > 1:
        threads = 1  # a build without OpenMP runs single-threaded (correct, slower)
    if fn(*args, 0, units, threads) != 0:
        raise MemoryError("causal_conv1d (cpu): the kernel could not allocate its scratch buffers")


def conv1d_cpu_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """As :func:`.ref.conv1d_ref_fwd`: ``(y [B, L, D] in x.dtype, final_state [B, D, W-1] float32)``."""
    if x.dtype == torch.float64:
        return ref.conv1d_ref_fwd(x, weight, bias, activation, initial_state)
    lib = library()
    B, L, D = x.shape
    W = weight.shape[1]
    xf, wf, bf, h0 = _f32(x), weight.to(torch.float32).t().contiguous(), _f32(bias), _f32(initial_state)
    y = torch.empty(B, L, D, dtype=torch.float32)
    final = torch.empty(B, D, W - 1, dtype=torch.float32)
    units = lib.mz_conv1d_units(B, L)
    args = [*map(_ptr, (xf, wf, bf, h0, y, final)), B, L, D, W, int(activation == "silu")]
    _run(lib.mz_conv1d_fwd, args, units, _threads(B * L * D, units))
    return (y if x.dtype == torch.float32 else y.to(x.dtype)), final


def conv1d_cpu_bwd(
    dy: Tensor,
    dfinal: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
) -> dict[str, Tensor | None]:
    """As :func:`.ref.conv1d_ref_bwd`: gradients keyed ``x, weight, bias, initial_state``."""
    if x.dtype == torch.float64:
        return ref.conv1d_ref_bwd(dy, dfinal, x, weight, bias, activation, initial_state)
    lib = library()
    B, L, D = x.shape
    W = weight.shape[1]
    xf, wf, bf, h0 = _f32(x), weight.to(torch.float32).t().contiguous(), _f32(bias), _f32(initial_state)
    gy, gT = _f32(dy), _f32(dfinal)
    units = lib.mz_conv1d_units(B, L)
    dx = torch.empty(B, L, D, dtype=torch.float32)
    dh0 = None if initial_state is None else torch.empty(B, D, W - 1, dtype=torch.float32)
    dw_part = torch.empty(units, W, D, dtype=torch.float32)
    db_part = torch.empty(units, D, dtype=torch.float32)
    args = [*map(_ptr, (gy, gT, xf, wf, bf, h0, dx, dh0, dw_part, db_part)), B, L, D, W, int(activation == "silu")]
    _run(lib.mz_conv1d_bwd, args, units, _threads(B * L * D, units))
    return {
        "x": dx.to(x.dtype),
        "weight": dw_part.sum(0).t().to(weight.dtype),  # fixed-order reduction over units
        "bias": None if bias is None else db_part.sum(0).to(bias.dtype),
        "initial_state": None if dh0 is None else dh0.to(initial_state.dtype),
    }
