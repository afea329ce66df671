"""Peak-memory measurement shared by every ``bench`` (kernels, backbones, pipelines).

* :class:`PeakMemory`: the peak memory of a block of code: on CUDA ``max_memory_allocated`` above what
  was held at entry; on Linux the growth of the peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the resident set at entry; elsewhere the process-lifetime peak.
* :func:`measurement_env` and :func:`run_measurement_child`: run a measurement in a fresh Python
  subprocess (so one measurement's allocator state cannot leak into the next), with glibc's mmap
  threshold fixed so the resident set tracks live memory, and read back its one tagged JSON line.

torch is imported where it is used: importing this module stays cheap.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def proc_status_bytes(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in bytes.

    Raises:
        OSError: not Linux, or the field is missing.
    """
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", _PROC_STATUS.read_text(), re.MULTILINE)
    if m is None:
        raise OSError(f"{field_name} not in {_PROC_STATUS}")
    return int(m.group(1)) * 1024


class PeakMemory:
    """Context manager measuring the peak memory of its block on ``device``.

    After the block, ``peak_bytes`` holds the peak above what was in use at entry (or the process
    peak where no reset is possible) and ``method`` says which measure was used:
    ``'cuda_max_allocated'``, ``'rss_peak'`` or ``'process_peak'``. On CPU the resident set misses
    allocations served from memory the allocator already holds; run under :func:`measurement_env`
    in a fresh process for repeatable numbers.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = ""
        self._base = 0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base, self.method = torch.cuda.memory_allocated(self.device), "cuda_max_allocated"
            return self
        try:
            _CLEAR_REFS.write_text("5")  # Linux: reset VmHWM to the current RSS
            self._base, self.method = proc_status_bytes("VmRSS"), "rss_peak"
        except OSError:
            self.method = "process_peak"
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method == "rss_peak":
            self.peak_bytes = max(0, proc_status_bytes("VmHWM") - self._base)
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_bytes = peak if sys.platform == "darwin" else peak * 1024


def measurement_env() -> dict[str, str]:
    """Environment of a peak-memory subprocess: this one with glibc's mmap threshold fixed at 64 KiB.

    glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, after
    which large tensors come from the heap, whose freed pages stay resident: the peak RSS then also
    counts memory that was free, and varied 73-124 MiB over fresh runs of the same DeiT-Tiny forward
    at 1248^2. A fixed threshold (which also turns the adjustment off) returns every block of
    64 KiB and more to the OS when freed, so the peak RSS tracks the live tensors (61.2 +- 0.1 MiB).
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_measurement_child(
    code: str, spec: str, tag: str, *, timeout: float
) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """Run ``python -c code spec`` under :func:`measurement_env` and parse the first stdout line that
    starts with ``tag`` as JSON.

    Returns:
        ``(result or None when no tagged line was printed, the finished process)``; the caller
        decides what a missing result means (a crash, an out-of-memory kill).
    """
    proc = subprocess.run(
        [sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=timeout, env=measurement_env()
    )
    for line in proc.stdout.splitlines():
        if line.startswith(tag):
            return json.loads(line[len(tag):]), proc
    return None, proc


def last_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last stderr line of a failed child (or its exit code when stderr is empty)."""
    return (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
