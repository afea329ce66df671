"""The bench harness: warm-up then round-robin timing, ratios within a case, peak memory, table and JSON."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from mz_pipelines.runtime.bench import BenchReport, Measurement, PeakMemory, compare, format_table


def test_warmup_then_round_robin_then_memory_calls() -> None:
    calls: list[str] = []
    ms = compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeat=3, memory=True)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3 + ["a", "b"]
    assert [m.name for m in ms] == ["a", "b"] and all(len(m.times_ms) == 3 for m in ms)
    assert all(t >= 0 for m in ms for t in m.times_ms)


def test_timings_and_ratios_reflect_the_work() -> None:
    cases = []
    for group, slow_s in (("short", 0.004), ("long", 0.024)):
        work = {"fast": lambda: time.sleep(0.002), "slow": lambda s=slow_s: time.sleep(s)}
        cases += compare(work, group=group, warmup=1, repeat=5, memory=False)
    report = BenchReport(cases, baseline="fast")
    by = {(m.group, m.name): m for m in cases}
    assert by[("long", "slow")].median_ms >= 24 and by[("short", "fast")].min_ms >= 2
    assert report.ratio(by[("short", "fast")]) == 1.0
    short, long = report.ratio(by[("short", "slow")]), report.ratio(by[("long", "slow")])
    assert short is not None and long is not None and 1.2 < short < long  # ratios are taken within each case
    assert by[("long", "slow")].peak_mem_bytes is None


def _return_free_heap_to_os() -> None:
    """glibc serves a large allocation from a free heap region when one is big enough (no new
    resident pages, so no RSS growth): earlier tests in this process can leave one. Trim the heap."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_sees_a_large_allocation() -> None:
    def big() -> None:
        x = torch.ones(1 << 24)  # 64 MiB, released on return
        x.add_(1)

    _return_free_heap_to_os()
    ms = compare({"big": big, "none": lambda: None}, warmup=1, repeat=1)
    assert ms[0].mem_method == "rss_peak" and ms[0].peak_mem_bytes is not None
    assert ms[0].peak_mem_bytes >= 60 * 2**20 and ms[1].peak_mem_bytes is not None and ms[1].peak_mem_bytes < 16 * 2**20
    # 256 MiB: far above glibc's largest dynamic mmap threshold (32 MiB), so the pages are fresh even
    # when earlier tests in this process left large freed regions in the heap
    with PeakMemory("cpu") as pm:
        keep = torch.zeros(1 << 26).add_(2)
    assert pm.peak_bytes is not None and pm.peak_bytes >= 250 * 2**20 and keep.numel() == 1 << 26


def test_table_and_json(tmp_path: Path) -> None:
    ms = [Measurement("loop", "L=8", [2.0, 4.0, 3.0], 2**20, "rss_peak"), Measurement("conv", "L=8", [1.0, 1.5, 2.0], None, "")]
    report = BenchReport(ms, baseline="loop", meta={"device": "cpu"})
    lines = report.table().splitlines()
    assert lines[0].split() == ["case", "candidate", "median", "ms", "mean", "ms", "std", "ms", "min", "ms", "peak", "MiB", "x", "loop"]
    assert lines[2].split() == ["L=8", "loop", "3.0", "3.0", "1.0", "2.0", "1.0", "1.0"]
    assert lines[3].split() == ["L=8", "conv", "1.5", "1.5", "0.5", "1.0", "0.5"]  # no memory: empty cell
    data = json.loads(report.write_json(tmp_path / "b.json").read_text())
    assert data["meta"] == {"device": "cpu"} and data["baseline"] == "loop"
    assert [r["ratio_to_baseline"] for r in data["results"]] == [1.0, 0.5] and data["results"][0]["times_ms"] == [2.0, 4.0, 3.0]


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    text = format_table([{"name": "a", "ms": 1.5}, {"name": "bb", "ms": 12.25}])
    assert text.splitlines() == ["name     ms", "----  -----", "a       1.5", "bb    12.25"]
    assert format_table([]) == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [({"repeat": 0}, "repeat must be an int >= 1"), ({"warmup": -1}, "warmup must be an int >= 0")],
    ids=["repeat", "warmup"],
)
def test_compare_validates(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compare({"a": lambda: None}, **kwargs)


def test_report_baseline_must_exist() -> None:
    with pytest.raises(ValueError, match=r"baseline must be one of \['a'\], got 'b'"):
        BenchReport([Measurement("a", "", [1.0])], baseline="b")
