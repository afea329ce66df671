"""Elementwise Triton helpers shared by the selective-scan, SSD and conv1d kernels.

Imported only by the Triton backends (never by ``import mz_kernels``).
"""
from __future__ import annotations

import triton
import triton.language as tl

SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # F.softplus is the identity above this input


@triton.jit
def rne_bf16(v):
    """float32 -> float32 holding the nearest bfloat16 (ties to even); for finite values."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store(ptrs, v, mask, EMU: tl.constexpr):
    """Store float32 ``v`` in the pointee dtype, rounding to nearest even (also under the interpreter)."""
    if EMU:
        if ptrs.dtype.element_ty == tl.bfloat16:
            v = rne_bf16(v)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def softplus(x):
    """``F.softplus``: max(x, 0) + log1p(exp(-|x|)), log1p in Kahan's form; the identity above the threshold."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def sigmoid(x):
    """Overflow-free logistic function."""
    e = tl.exp(-tl.abs(x))  # in (0, 1]: no overflow for any x
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)
