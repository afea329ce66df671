"""mz_kernels: selective-scan operators (Mamba-1 S6, Mamba-2 SSD, causal conv1d, single-step
updates) and scan-order permutations, with ``ref``, ``chunked``, ``cpu`` and ``triton`` backends.

Layout is channel-last throughout: tokens ``[B, L, D]``, per-step B/C ``[B, L, G, N]``,
state ``[B, D, N]``; the state and every exponential are float32.
"""
from __future__ import annotations

from ._backend import BACKENDS, backend_status
from . import _probes  # noqa: F401  (registers the availability probes of the optional backends)
from .selective_scan import selective_scan, selective_scan_fn, selective_scan_step
from .conv1d import causal_conv1d, causal_conv1d_step
from .ssd import SSD_BACKENDS, ssd_scan, ssd_step
from . import scan_orders
from .scan_orders import *  # noqa: F403  (flip, cross_scan_2d, ..., see scan_orders.__all__)

__all__ = [
    "BACKENDS",
    "backend_status",
    "selective_scan",
    "selective_scan_fn",
    "selective_scan_step",
    "ssd_scan",
    "ssd_step",
    "SSD_BACKENDS",
    "causal_conv1d",
    "causal_conv1d_step",
    "scan_orders",
    *scan_orders.__all__,
]
__version__ = "0.1.0"
