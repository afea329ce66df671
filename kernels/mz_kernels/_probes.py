"""Availability probes of the optional backends (``cpu``: compiled on first use; ``triton``)."""
from __future__ import annotations

import importlib.util

from ._backend import register_probe, triton_interpreted


def _triton_probe() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("mz_kernels.selective_scan.triton") is None:
        return "the Triton kernels are not part of this version yet"
    import torch

    if not torch.cuda.is_available() and not triton_interpreted():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
    return None


def _cpu_probe() -> str | None:
    if importlib.util.find_spec("mz_kernels.selective_scan.cpu") is None:
        return "the fused CPU kernel is not part of this version yet"
    from .conv1d import cpu as conv1d_cpu
    from .selective_scan import cpu

    return cpu.probe() or conv1d_cpu.probe()


register_probe("triton", _triton_probe)
register_probe("cpu", _cpu_probe)
