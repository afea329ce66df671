"""Shared peak-memory measurement: the fixed-threshold child environment keeps freed memory out of the
resident set, tagged results come back from a child, failures say why (PeakMemory itself is tested in
tests/pipelines/test_runtime_bench.py)."""
from __future__ import annotations

import sys

import pytest

from mz_kernels.measure import last_error_line, measurement_env, run_measurement_child

_FREED_PROBE = """
import json, torch
from mz_kernels.measure import proc_status_bytes
big = torch.ones(24 * 2**20 // 4); del big     # glibc's default raises its mmap threshold here
rss0 = proc_status_bytes("VmRSS")
t = torch.ones(16 * 2**20 // 4); del t          # then this block would come from the heap and stay resident
print("MZ_TEST " + json.dumps((proc_status_bytes("VmRSS") - rss0) // 2**20))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@linux_only
def test_measurement_env_returns_freed_tensors_to_the_os() -> None:
    """Under the child environment, freed large tensors leave the resident set, so the peak RSS counts
    live memory only (glibc's defaults keep the 16 MiB block resident: 15 MiB on the dev VM)."""
    result, proc = run_measurement_child(_FREED_PROBE, "", "MZ_TEST ", timeout=120)
    assert proc.returncode == 0, last_error_line(proc)
    assert result is not None and result < 4


def test_child_result_is_parsed_and_failures_are_reported() -> None:
    ok, proc = run_measurement_child("import sys, json; print('noise'); print('TAG ' + json.dumps({'arg': sys.argv[1]}))",
                                     "hello", "TAG ", timeout=60)
    assert ok == {"arg": "hello"} and proc.returncode == 0
    missing, proc = run_measurement_child("import sys; sys.exit('child says no')", "", "TAG ", timeout=60)
    assert missing is None and last_error_line(proc) == "child says no"
    assert measurement_env()["MALLOC_MMAP_THRESHOLD_"] == "65536"
