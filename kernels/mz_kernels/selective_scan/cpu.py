"""``cpu`` backend: a fused C kernel (``csrc/scan_cpu.c``) compiled on first use, called through ctypes.

Implements the backend contract of :mod:`._common`. u/delta/z/B/C (float32, float16 or bfloat16)
are converted to contiguous float32 before the C call and ``y`` and the gradients are cast back to
the input dtypes; all arithmetic, the state and the exponentials are float32. float64 inputs (used
by gradcheck) are delegated to the ``ref`` backend.

The kernel never builds ``[B, L, D, N]``: channels are cut into blocks that never cross a group, and
OpenMP threads (``torch.get_num_threads()`` of them) take work units of (batch row, run of blocks),
each walking t = 0..L-1 with its blocks' states in a small local buffer, vectorised across channels
(so N = 1 vectorises as well as N = 16). The backward walks the ``CKPT``-step chunks in reverse,
recomputing each chunk's states from the saved checkpoints. Reductions over batch and over a
group's channel blocks use per-unit partial buffers summed in a fixed order, without atomics:
results are bit-identical run to run and do not depend on the thread count.

Importing this module is cheap: the library is built lazily, on the first :func:`probe` or call.
"""
from __future__ import annotations

import ctypes
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .._cbuild import CBuildError, load_library
from . import ref
from ._common import CKPT, cast_grads, n_ckpt

_SOURCE = Path(__file__).with_name("csrc") / "scan_cpu.c"
_VW = 16  # block widths are multiples of this (a multiple of the kernel's vector width VW: 16, 8 or 4)
_FWD_STATE_FLOATS = 2048  # per-unit state N * block width in the forward (stays in L1)
_BWD_STATE_FLOATS = 1024  # same in the backward, which keeps CKPT steps of states and decays (L2)
_MAX_BLOCK = 256
_MIN_UNITS = 8  # split rows further while there are fewer units than this
_GRAIN = 1 << 16  # state-element steps per thread below which fewer threads are used

_lib: ctypes.CDLL | None = None

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "mz_scan_has_openmp": ([], ctypes.c_int),
    "mz_scan_ckpt": ([], ctypes.c_int),
    "mz_scan_units": ([_I] * 5, _I),
    "mz_scan_fwd": ([_P] * 12 + [_I] * 7 + [ctypes.c_int, _I, _I, ctypes.c_int], ctypes.c_int),
    "mz_scan_bwd": ([_P] * 20 + [_I] * 7 + [ctypes.c_int, _I, _I, ctypes.c_int], ctypes.c_int),
    "mz_scan_sum_mid": ([_P, _P, _I, _I, _I, ctypes.c_int], None),
}


def library() -> ctypes.CDLL:
    """The compiled kernel library (built and cached on first use).

    Raises:
        CBuildError: no C compiler, or the build failed (one-line reason).
    """
    global _lib
    if _lib is None:
        lib = load_library(_SOURCE, _SIGNATURES)
        if lib.mz_scan_ckpt() != CKPT:
            raise CBuildError(f"scan_cpu.c checkpoint spacing {lib.mz_scan_ckpt()} != CKPT = {CKPT}")
        _lib = lib
    return _lib


def probe() -> str | None:
    """``None`` when the kernel builds and loads here, else a one-line reason (warned once per process).

    ``mz_kernels._probes`` registers this as the ``cpu`` availability probe, whose result
    ``mz_kernels._backend`` caches, so the warning is issued at most once per process."""
    try:
        library()
    except CBuildError as e:
        warnings.warn(
            f"mz_kernels: selective-scan backend 'cpu' is unavailable ({e}); 'auto' falls back to a PyTorch backend",
            RuntimeWarning,
            stacklevel=2,
        )
        return str(e)
    return None


def plan(Bsz: int, D: int, G: int, N: int, state_floats: int) -> tuple[int, int]:
    """Work split ``(bw, bpu)``: channels per block and blocks per work unit.

    A block is a multiple of 16 channels (or its whole group if smaller) inside one group; a unit
    holds up to ``state_floats`` state floats (so it stays in cache) as consecutive blocks of one
    batch row, split further while there are fewer than ``_MIN_UNITS`` units. The plan depends only
    on the shape, not on the thread count, so results are the same for any number of threads.
    """
    Dg = D // G
    if Dg <= _VW:
        bw = Dg
    else:
        cap = max(_VW, min(_MAX_BLOCK, state_floats // N // _VW * _VW))
        nbpg = math.ceil(Dg / cap)
        while Bsz * G * nbpg < _MIN_UNITS and math.ceil(Dg / (nbpg + 1)) >= _VW:
            nbpg += 1
        bw = min(Dg, math.ceil(math.ceil(Dg / nbpg) / _VW) * _VW)
    blocks = G * math.ceil(Dg / bw)
    padded = math.ceil(bw / _VW) * _VW
    bpu = max(1, min(blocks, state_floats // (N * padded)))
    while bpu > 1 and Bsz * math.ceil(blocks / bpu) < _MIN_UNITS:
        bpu -= 1
    return bw, bpu


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _launch(fn, args: list, n_units: int, work: int) -> None:
    """Run ``fn(*args, k0, k1, nthreads)`` over all units: one OpenMP call, or (a build without
    OpenMP) one call per thread on a slice of the units; ctypes releases the GIL during each call.
    Small problems (``work`` state-element steps) use fewer threads than ``torch.get_num_threads()``."""
    lib = library()
    threads = max(1, min(torch.get_num_threads(), n_units, work // _GRAIN))
    if lib.mz_scan_has_openmp() or threads == 1 or n_units == 1:
        rcs = [fn(*args, 0, n_units, threads)]
    else:
        bounds = [n_units * i // threads for i in range(threads + 1)]
        with ThreadPoolExecutor(threads) as pool:
            rcs = list(pool.map(lambda i: fn(*args, bounds[i], bounds[i + 1], 1), range(threads)))
    if any(rc != 0 for rc in rcs):
        raise MemoryError("selective_scan (cpu): the kernel could not allocate its scratch buffers")


def _sum_mid(x: Tensor, outer: int, nsum: int, inner: int) -> Tensor:
    """``x [outer, nsum, inner] -> [outer, inner]`` summed over the middle dim in a fixed order."""
    out = torch.empty(outer, inner, dtype=torch.float32)
    threads = torch.get_num_threads() if outer >= 64 and outer * nsum * inner >= _GRAIN else 1
    library().mz_scan_sum_mid(x.data_ptr(), out.data_ptr(), outer, nsum, inner, threads)
    return out


def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states):
    """Backend contract forward; see :mod:`._common`. ``u, delta, z [B, L, D]``, ``A [D, N]``,
    ``B, C [B, L, G, N]``, ``D, delta_bias [D]``, ``initial_state [B, D, N]``."""
    if u.dtype == torch.float64:
        return ref.forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_states)
    lib = library()
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    uf, df, Bf, Cf, zf = _f32(u), _f32(delta), _f32(B), _f32(C), _f32(z)
    At = A.to(torch.float32).t().contiguous()  # [N, D]: channels contiguous
    Df, bf, h0 = _f32(D), _f32(delta_bias), _f32(initial_state)
    y = torch.empty(Bsz, L, Dm, dtype=torch.float32)
    final = torch.empty(Bsz, Dm, N, dtype=torch.float32)
    saved = torch.empty(Bsz, n_ckpt(L) if save_states else 0, Dm, N, dtype=torch.float32)
    bw, bpu = plan(Bsz, Dm, G, N, _FWD_STATE_FLOATS)
    args = [
        *map(_ptr, (uf, df, At, Bf, Cf, Df, zf, bf, h0, y, final, saved if save_states else None)),
        Bsz, L, Dm, N, G, bw, bpu, int(delta_softplus),
    ]
    _launch(lib.mz_scan_fwd, args, lib.mz_scan_units(Bsz, Dm, G, bw, bpu), Bsz * L * Dm * N)
    return (y if u.dtype == torch.float32 else y.to(u.dtype)), final, saved


def backward(grad_y, grad_final, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    """Backend contract backward; see :mod:`._common`. Returns
    ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)`` in the inputs' dtypes."""
    ins = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if u.dtype == torch.float64:
        return ref.backward(grad_y, grad_final, saved, *ins, delta_softplus)
    lib = library()
    if saved.shape[1] == 0:  # forward ran without grad bookkeeping: rebuild the checkpoints
        saved = forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, True)[2]
    Bsz, L, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    bw, bpu = plan(Bsz, Dm, G, N, _BWD_STATE_FLOATS)
    nbpg = math.ceil(Dm // G / bw)
    uf, df, Bf, Cf, zf = _f32(u), _f32(delta), _f32(B), _f32(C), _f32(z)
    At = A.to(torch.float32).t().contiguous()
    Df, bf = _f32(D), _f32(delta_bias)
    gy, gT, sv = _f32(grad_y), _f32(grad_final), _f32(saved)
    f32 = dict(dtype=torch.float32)
    du, ddelta = torch.empty(Bsz, L, Dm, **f32), torch.empty(Bsz, L, Dm, **f32)
    dz = None if z is None else torch.empty(Bsz, L, Dm, **f32)
    dAp = torch.empty(Bsz, Dm, N, **f32)
    dBp, dCp = torch.empty(Bsz, L, G, nbpg, N, **f32), torch.empty(Bsz, L, G, nbpg, N, **f32)
    dDp, dbp = torch.empty(Bsz, Dm, **f32), torch.empty(Bsz, Dm, **f32)
    dh0 = None if initial_state is None else torch.empty(Bsz, Dm, N, **f32)
    args = [
        *map(_ptr, (gy, gT, sv, uf, df, At, Bf, Cf, Df, zf, bf, du, ddelta, dz, dAp, dBp, dCp, dDp, dbp, dh0)),
        Bsz, L, Dm, N, G, bw, bpu, int(delta_softplus),
    ]
    _launch(lib.mz_scan_bwd, args, lib.mz_scan_units(Bsz, Dm, G, bw, bpu), 3 * Bsz * L * Dm * N)
    dA = _sum_mid(dAp, 1, Bsz, Dm * N).view(Dm, N)
    if nbpg == 1:  # one block per group: the partial sums are the sums
        dB, dC = dBp.view(Bsz, L, G, N), dCp.view(Bsz, L, G, N)
    else:
        dB = _sum_mid(dBp, Bsz * L * G, nbpg, N).view(Bsz, L, G, N)
        dC = _sum_mid(dCp, Bsz * L * G, nbpg, N).view(Bsz, L, G, N)
    dD = None if D is None else _sum_mid(dDp, 1, Bsz, Dm).view(Dm)
    dbias = None if delta_bias is None else _sum_mid(dbp, 1, Bsz, Dm).view(Dm)
    return cast_grads((du, ddelta, dA, dB, dC, dD, dz, dbias, dh0), ins)
