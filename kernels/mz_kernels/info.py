"""``mambazoo info``: versions, devices and which kernel backends run here (and why not)."""
from __future__ import annotations

import platform
import sys


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
    except Exception as e:  # optional dependency missing or broken
        return f"not installed ({type(e).__name__})"
    return str(getattr(m, "__version__", "unknown"))


def format_info() -> str:
    """Multi-line report: Python/torch/numpy/triton versions, devices, backend availability."""
    import torch

    import mz_kernels
    from mz_kernels._backend import backend_status

    lines = [
        f"mambazoo      {mz_kernels.__version__}",
        f"python        {sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
        f"torch         {torch.__version__} (threads {torch.get_num_threads()})",
        f"numpy         {_version('numpy')}",
        f"triton        {_version('triton')}",
        f"cuda          {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}",
        "kernel backends:",
    ]
    for name, reason in backend_status().items():
        lines.append(f"  {name:<8} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
