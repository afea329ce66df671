"""Small helpers shared by the custom-op wrappers of every op."""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """Working precision of an op: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fresh(t: Tensor, *inputs: Tensor) -> Tensor:
    """``t`` contiguous and not sharing memory with any of ``inputs`` (custom-op outputs may not alias inputs)."""
    ptr = t.untyped_storage().data_ptr()
    if not t.is_contiguous() or any(ptr == i.untyped_storage().data_ptr() for i in inputs):
        return t.clone(memory_format=torch.contiguous_format)
    return t
