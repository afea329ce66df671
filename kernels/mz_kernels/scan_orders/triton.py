"""Triton kernels of the two token movers (``mz::gather_tokens`` / ``mz::scatter_tokens``).

Used by ``_ops.py`` for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` with
``MZ_SCAN_ORDER_BACKEND=triton``); ``import mz_kernels`` never imports this module. Tokens are
channel-last and contiguous: ``x [B, L, C]``, scanned copies ``y [B, L', K, C]``.

Design:

* **Grid** ``(cdiv(L or L', BL), cdiv(C, BC), B)``: one program per tile of ``BL`` tokens, tile of
  ``BC`` channels and batch row. Every token is a contiguous run of ``C`` channels, so a ``[BL,
  BC]`` tile is ``BL`` coalesced row segments wherever the rows come from (``BC * itemsize`` >= 32
  bytes, one full sector, as soon as ``C >= 16``). ``BC`` is 64, 32 or 16 when it divides ``C``
  (no masked lanes: ``C = 96`` takes ``BC = 32``), else ``min(next_pow2(C), 64)``; ``BL = 2048 //
  BC`` (capped by the length), so a tile is at most 2048 elements and, at ``num_warps = 4`` (128
  threads), 16 per thread: 16-byte vector accesses in float32 and a 16-register float32
  accumulator in the merges. Batch rows beyond the CUDA grid limit (65535) are launched in chunks.
* **Tables (every order)**. The gather walks scan positions ``j``: for each direction ``k`` it
  loads ``index[k, j-tile]`` and the ``[BL, BC]`` rows it names (zero where ``-1``) and stores them
  at ``y[b, j, k, :]``. The merge walks grid tokens ``i``: for each ``k`` it loads
  ``y[b, inverse[k, i], k, :]`` (zero where ``-1``) and adds it to a float32 register tile, then
  writes ``out[b, i, :]`` once. Each scanned copy is read exactly once, nothing is materialised
  between the K reads and the sum, and there are no atomics, so the merge is deterministic (K
  summed in order 0..K-1).
* **Raster orders, analytic (no tables)**. Every direction of ``cross4`` / ``bi`` / ``uni``
  (VMamba), of ``tri_scan_3d`` (SegMamba ToM: forward, reverse, inter-slice) and of the
  temporal-first clip order reads an ``R x S`` grid row-major or column-major, forward or
  reversed: 2D grids have ``(R, S) = (H, W)``; a volume is a ``D x (H*W)`` grid, whose
  column-major order is the inter-slice order. Such orders are recognised once per index tensor
  (:func:`raster_plan`, cached by tensor identity) and then run without tables: grid token
  ``i = h*S + w`` sits at position ``i`` (row-major), ``w*R + h`` (column-major), or ``L - 1``
  minus either (reversed). Both kernels walk grid tokens ``i``: the scan loads each ``[BL, BC]``
  tile of ``x`` once and stores it to its K positions (K coalesced row stores; ``x`` is read
  once, as in VMamba's ``csm_triton``), the merge loads the K rows of each token and sums them in
  float32 as above. The direction codes are a compile-time constant, so each direction's
  arithmetic is resolved when the kernel is specialised.
* **Numerics**: the gathers copy bits (exact in every dtype); the merges add in float32 and store
  in the input dtype. Supported dtypes: float32, float16, bfloat16 (``_ops.py`` sends others to the
  torch path). Offsets into tokens are int64 (``B * L * K * C`` may pass 2**31 for 3D volumes).

These are design choices, not tuned on hardware.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUM_WARPS = 4
TILE_ELEMENTS = 2048  # BL * BC
MAX_BLOCK_C = 64
MAX_GRID_Z = 65535  # CUDA limit of grid axes 1 and 2

# direction codes of a raster order over an R x S grid
ROW_MAJOR, COLUMN_MAJOR, ROW_MAJOR_REVERSED, COLUMN_MAJOR_REVERSED = 0, 1, 2, 3
_CODE_BITS = 2


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _raster_position(i, h, w, R, L, CODE: tl.constexpr):
    """Scan position of grid token ``i = h*S + w`` in the direction with code ``CODE``."""
    p = i
    if CODE == 1:
        p = w * R + h
    elif CODE == 2:
        p = L - 1 - i
    elif CODE == 3:
        p = L - 1 - (w * R + h)
    return p


@triton.jit
def gather_table_kernel(
    x_ptr, y_ptr, index_ptr, L, Lp, C,
    K: tl.constexpr, HOLES: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """``y[b, j, k, c] = x[b, index[k, j], c]`` (0 where -1); x [B, L, C], index [K, L'], y [B, L', K, C]."""
    j = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    mj = j < Lp
    m = mj[:, None] & (c < C)[None, :]
    x_b = x_ptr + b * L * C
    y_rows = (b * Lp + j.to(tl.int64)) * K  # [BL] first row of position j in y viewed as [B*L'*K, C]
    for k in tl.static_range(K):
        src = tl.load(index_ptr + k * Lp + j, mask=mj, other=0)  # [BL] int64
        mk = m
        if HOLES:
            mk = m & (src >= 0)[:, None]
        v = tl.load(x_b + src[:, None] * C + c[None, :], mask=mk, other=0)
        tl.store(y_ptr + (y_rows + k)[:, None] * C + c[None, :], v, mask=m)


@triton.jit
def scatter_table_kernel(
    y_ptr, out_ptr, inverse_ptr, L, Lp, C,
    K: tl.constexpr, HOLES: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """``out[b, i, c] = sum_k y[b, inverse[k, i], k, c]`` (terms with -1 dropped), summed in float32."""
    i = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    mi = i < L
    m = mi[:, None] & (c < C)[None, :]
    y_b = y_ptr + b * Lp * K * C
    acc = tl.zeros([BL, BC], dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(inverse_ptr + k * L + i, mask=mi, other=0)  # [BL] int64
        mk = m
        if HOLES:
            mk = m & (pos >= 0)[:, None]
        v = tl.load(y_b + (pos * K + k)[:, None] * C + c[None, :], mask=mk, other=0)
        acc += v.to(tl.float32)
    out_rows = b * L + i.to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def raster_scan_kernel(
    x_ptr, y_ptr, R, S, C,
    K: tl.constexpr, CODES: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """Raster orders of an R x S grid: ``y[b, p_k(i), k, c] = x[b, i, c]``; x [B, R*S, C], y [B, R*S, K, C].

    ``CODES`` packs direction k's code in bits ``2k .. 2k+1``.
    """
    L = R * S
    i = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    m = (i < L)[:, None] & (c < C)[None, :]
    h = i // S
    w = i - h * S
    v = tl.load(x_ptr + (b * L + i.to(tl.int64))[:, None] * C + c[None, :], mask=m)
    for k in tl.static_range(K):
        p = _raster_position(i, h, w, R, L, (CODES >> (2 * k)) & 3)
        y_rows = (b * L + p.to(tl.int64)) * K + k
        tl.store(y_ptr + y_rows[:, None] * C + c[None, :], v, mask=m)


@triton.jit
def raster_merge_kernel(
    y_ptr, out_ptr, R, S, C,
    K: tl.constexpr, CODES: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """Adjoint of :func:`raster_scan_kernel`: ``out[b, i, c] = sum_k y[b, p_k(i), k, c]`` in float32."""
    L = R * S
    i = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    m = (i < L)[:, None] & (c < C)[None, :]
    h = i // S
    w = i - h * S
    acc = tl.zeros([BL, BC], dtype=tl.float32)
    for k in tl.static_range(K):
        p = _raster_position(i, h, w, R, L, (CODES >> (2 * k)) & 3)
        y_rows = (b * L + p.to(tl.int64)) * K + k
        acc += tl.load(y_ptr + y_rows[:, None] * C + c[None, :], mask=m).to(tl.float32)
    out_rows = b * L + i.to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# recognising raster orders


class RasterPlan(NamedTuple):
    """An order whose K directions each read an ``rows x cols`` grid in one of four raster orders.

    Attributes:
        rows, cols: grid sizes R and S (L = R * S); ``rows = 1`` when no direction is column-major.
        codes: per direction, ``ROW_MAJOR``, ``COLUMN_MAJOR``, ``ROW_MAJOR_REVERSED`` or
            ``COLUMN_MAJOR_REVERSED``.
    """

    rows: int
    cols: int
    codes: tuple[int, ...]

    @property
    def packed(self) -> int:
        return sum(code << (_CODE_BITS * k) for k, code in enumerate(self.codes))


def _classify(index: Tensor) -> RasterPlan | None:
    """The raster plan equal to ``index`` [K, L] (no holes), or ``None``."""
    table = index.detach().to("cpu", torch.long)
    K, L = table.shape
    ramp = torch.arange(L)
    rows = None
    codes = []
    for row in table:  # K rows, not tokens
        if torch.equal(row, ramp):
            codes.append(ROW_MAJOR)
            continue
        if torch.equal(row, ramp.flip(0)):
            codes.append(ROW_MAJOR_REVERSED)
            continue
        for code, seq in ((COLUMN_MAJOR, row), (COLUMN_MAJOR_REVERSED, row.flip(0))):
            # column-major over R x S reads token S second (row 1, column 0)
            S = int(seq[1]) if L > 1 else 0
            if S < 1 or L % S or (rows is not None and L // S != rows):
                continue
            if torch.equal(seq, ramp.view(L // S, S).t().reshape(-1)):
                rows = L // S
                codes.append(code)
                break
        else:
            return None
    rows = 1 if rows is None else rows
    return RasterPlan(rows, L // rows, tuple(codes))


_PLANS: dict[int, tuple[weakref.ref, int, RasterPlan | None]] = {}


def _forget(key: int) -> None:
    _PLANS.pop(key, None)


def raster_plan(index: Tensor, inverse: Tensor, index_holes: bool, inverse_holes: bool) -> RasterPlan | None:
    """Recognise a raster order (see the module notes), memoised per index tensor.

    The first call per tensor copies ``index`` [K, L'] to the host (one device sync); later calls
    with the same, unmodified tensor cost a dictionary lookup. Orders with holes, ``L' != L``,
    and calls during CUDA graph capture (where a sync is not allowed) get ``None``.

    Returns:
        the plan, or ``None`` when the generic table kernels must run.
    """
    if index_holes or inverse_holes or index.shape[1] != inverse.shape[1] or index.shape[0] == 0:
        return None
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    key = id(index)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is index and hit[1] == index._version:
        return hit[2]
    plan = _classify(index)
    _PLANS[key] = (weakref.ref(index, lambda _, key=key: _forget(key)), index._version, plan)
    return plan


# --------------------------------------------------------------------------------------------
# launchers


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                              or value & (value - 1)):
        raise ValueError(f"scan_orders.triton: {name} must be a power of two >= 1 or None, got {value!r}")


def pick_blocks(length: int, C: int, block_l: int | None = None, block_c: int | None = None) -> tuple[int, int]:
    """Tile sizes ``(BL, BC)`` for ``length`` tokens of ``C`` channels (see the module notes)."""
    _check_block("block_l", block_l)
    _check_block("block_c", block_c)
    if block_c is None:
        block_c = next((bc for bc in (64, 32, 16) if C % bc == 0), min(triton.next_power_of_2(C), MAX_BLOCK_C))
    if block_l is None:
        block_l = min(TILE_ELEMENTS // block_c, triton.next_power_of_2(max(length, 1)))
    return block_l, block_c


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_tokens(op: str, name: str, t: Tensor) -> Tensor:
    if t.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16 for the Triton kernels, got "
                         f"{str(t.dtype).replace('torch.', '')}")
    return t.contiguous()


def _launch(kernel, src: Tensor, dst: Tensor, args: tuple, tiles: int, block_c: int, C: int, **meta) -> None:
    """``kernel(src, dst, *args)`` over batch chunks of at most ``MAX_GRID_Z`` rows (src, dst share dim 0)."""
    with _device_guard(src):
        for b0 in range(0, src.shape[0], MAX_GRID_Z):
            n = min(MAX_GRID_Z, src.shape[0] - b0)
            grid = (tiles, triton.cdiv(C, block_c), n)
            kernel[grid](src[b0:b0 + n], dst[b0:b0 + n], *args, num_warps=NUM_WARPS, **meta)


def gather(
    x: Tensor,
    index: Tensor,
    inverse: Tensor,
    index_holes: bool,
    inverse_holes: bool,
    *,
    analytic: bool = True,
    block_l: int | None = None,
    block_c: int | None = None,
) -> Tensor:
    """Triton ``mz::gather_tokens``: x [B, L, C] -> [B, L', K, C] following ``index`` [K, L'].

    Args:
        x: tokens [B, L, C] (float32, float16 or bfloat16).
        index, inverse, index_holes, inverse_holes: the order, as in ``_ops.py``.
        analytic: use the table-free kernel when the order is a raster order.
        block_l, block_c: tile sizes (powers of two); ``None`` picks them (:func:`pick_blocks`).

    Returns:
        [B, L', K, C] in ``x.dtype``.
    """
    x = _check_tokens("gather_tokens", "x", x)
    B, L, C = x.shape
    K, Lp = index.shape
    y = x.new_empty(B, Lp, K, C)
    if y.numel() == 0:
        return y
    plan = raster_plan(index, inverse, index_holes, inverse_holes) if analytic else None
    BL, BC = pick_blocks(L if plan else Lp, C, block_l, block_c)
    if plan is not None:
        _launch(raster_scan_kernel, x, y, (plan.rows, plan.cols, C), triton.cdiv(L, BL), BC, C,
                K=K, CODES=plan.packed, BL=BL, BC=BC)
    else:
        _launch(gather_table_kernel, x, y, (index.contiguous(), L, Lp, C), triton.cdiv(Lp, BL), BC, C,
                K=K, HOLES=bool(index_holes), BL=BL, BC=BC)
    return y


def scatter(
    y: Tensor,
    index: Tensor,
    inverse: Tensor,
    index_holes: bool,
    inverse_holes: bool,
    *,
    analytic: bool = True,
    block_l: int | None = None,
    block_c: int | None = None,
) -> Tensor:
    """Triton ``mz::scatter_tokens``: y [B, L', K, C] -> [B, L, C], un-permuted and summed over K.

    Args:
        y: scanned tokens [B, L', K, C] (float32, float16 or bfloat16).
        index, inverse, index_holes, inverse_holes: the order, as in ``_ops.py``.
        analytic, block_l, block_c: as in :func:`gather`.

    Returns:
        [B, L, C] in ``y.dtype``, summed in float32.
    """
    y = _check_tokens("scatter_tokens", "y", y)
    B, Lp, K, C = y.shape
    L = inverse.shape[1]
    out = y.new_empty(B, L, C)
    if out.numel() == 0:
        return out
    plan = raster_plan(index, inverse, index_holes, inverse_holes) if analytic else None
    BL, BC = pick_blocks(L, C, block_l, block_c)
    if plan is not None:
        _launch(raster_merge_kernel, y, out, (plan.rows, plan.cols, C), triton.cdiv(L, BL), BC, C,
                K=K, CODES=plan.packed, BL=BL, BC=BC)
    else:
        _launch(scatter_table_kernel, y, out, (inverse.contiguous(), L, Lp, C), triton.cdiv(L, BL), BC, C,
                K=K, HOLES=bool(inverse_holes), BL=BL, BC=BC)
    return out
